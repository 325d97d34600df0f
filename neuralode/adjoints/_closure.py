"""Closure conversion of the functions a solve calls, for adjoints built on a custom VJP.

A custom VJP differentiates only its explicit inputs. A vector field that closes over
arrays (`ODETerm(lambda t, y, args: model(y))`, the way most people write one), or a
`SaveAt(fn=...)` that does, would make JAX raise `CustomVJPException`; converted, those
arrays become leaves of the function and receive their cotangents like any parameter.
"""

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
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
