"""Closure conversion of the functions a solve calls, for adjoints built on a custom VJP.

A custom VJP differentiates only its explicit inputs. A vector field that closes over
arrays (`ODETerm(lambda t, y, args: model(y))`, the way most people write one), or a
`SaveAt(fn=...)` or an event's `cond_fn` that does, would make JAX raise
`CustomVJPException`; converted, those arrays become leaves of the function and receive
their cotangents like any parameter.
"""

import functools as ft
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.core
import jax.tree_util as jtu


class _ClosureConvertedTerm(diffrax.AbstractTerm):
    term: diffrax.AbstractTerm
    vf_converted: Callable

    def vf(self, t, y, args):
        return self.vf_converted(t, y, args)

    def contr(self, t0, t1, **kwargs):
        return self.term.contr(t0, t1, **kwargs)

    def prod(self, vf, control):
        return self.term.prod(vf, control)

    def is_vf_expensive(self, t0, t1, y, args):
        return self.term.is_vf_expensive(t0, t1, y, args)


def _convert(fn: Callable, owner, t, y, args) -> Callable | None:
    """`fn(t, y, args)` closure-converted, or `None` when it closes over no tracer but
    the leaves of `owner` (as with `ODETerm(module)`): converting then would hold every
    parameter twice."""
    converted = eqx.filter_closure_convert(fn, t, y, args)
    own_leaves = {id(leaf) for leaf in jtu.tree_leaves(owner)}
    foreign = [
        c
        for c in jtu.tree_leaves(getattr(converted, "consts", ()))
        if isinstance(c, jax.core.Tracer) and id(c) not in own_leaves
    ]
    return converted if foreign else None


def closure_convert_terms(
    terms: diffrax.AbstractTerm, t, y, args
) -> diffrax.AbstractTerm:
    """`terms` with `vf` closure-converted for inputs shaped like `(t, y, args)`, if it
    closes over tracers of its own."""
    converted = _convert(terms.vf, terms, t, y, args)
    return terms if converted is None else _ClosureConvertedTerm(terms, converted)


def closure_convert_fn(fn: Callable, t, y, args) -> Callable:
    """`fn(t, y, args)` (e.g. a `SaveAt(fn=...)`), closure-converted if it closes over
    tracers that are not its own leaves."""
    converted = _convert(fn, fn, t, y, args)
    return fn if converted is None else converted


class _CondFn(eqx.Module):
    """An event's `cond_fn` with Diffrax's keyword arguments already bound."""

    bound: Callable

    def __call__(self, t, y, args, **kwargs):
        del kwargs  # bound at conversion: the same throughout one solve
        return self.bound(t, y, args)


def closure_convert_event(event: diffrax.Event | None, t, y, args, **kwargs):
    """`event` with each `cond_fn` closure-converted for inputs shaped like
    `(t, y, args)`, its keyword arguments (`terms`, `solver`, `t0`, ... as Diffrax
    passes them) bound: every array it uses is then a leaf of the event."""
    if event is None:
        return None

    def convert(cond_fn):
        bound = ft.partial(cond_fn, **kwargs)
        return _CondFn(eqx.filter_closure_convert(bound, t, y, args))

    cond_fns = jtu.tree_map(convert, event.cond_fn, is_leaf=callable)
    return eqx.tree_at(lambda e: e.cond_fn, event, cond_fns)
