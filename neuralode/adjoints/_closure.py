"""Closure conversion of a term's vector field, for adjoints built on a custom VJP.

A custom VJP differentiates only its explicit inputs. A vector field that closes over
arrays (`ODETerm(lambda t, y, args: model(y))`, the way most people write one) would make
JAX raise `CustomVJPException`; converted, those arrays become leaves of the term and
receive their cotangents like any parameter.
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


def closure_convert_terms(
    terms: diffrax.AbstractTerm, t, y, args
) -> diffrax.AbstractTerm:
    """`terms` with `vf` closure-converted for inputs shaped like `(t, y, args)`, or
    `terms` itself when its vector field closes over no tracer but its own leaves (as
    with `ODETerm(module)`): converting then would hold every parameter twice."""
    converted = eqx.filter_closure_convert(terms.vf, t, y, args)
    own_leaves = {id(leaf) for leaf in jtu.tree_leaves(terms)}
    foreign = [
        c
        for c in jtu.tree_leaves(getattr(converted, "consts", ()))
        if isinstance(c, jax.core.Tracer) and id(c) not in own_leaves
    ]
    return _ClosureConvertedTerm(terms, converted) if foreign else terms
