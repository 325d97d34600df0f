"""Checks of a solve's inputs that every strategy makes before it solves, so that bad
input fails early with a message that says what was wrong.

- At trace time: the vector field of each `diffrax.ODETerm` must return dy/dt with the
  state's structure, shapes and dtypes. (Diffrax checks the structure, and a wrong
  shape fails inside it as a broadcasting error before an adjoint is called:
  `NeuralODE` checks both first; a wrong dtype Diffrax silently promotes.)
- At run time, with `diffeqsolve(..., throw=True)` (Diffrax's default): y0 and the
  floating-point arrays of `args` and of the terms (the field's parameters) must be
  finite. A NaN there otherwise propagates to the loss and the gradient without a word.

A run-time check (`eqx.error_if`) passes its operand through a host callback, which XLA
cannot split across devices: a batch sharded over devices would be gathered whole onto
every one of them. `error_through_scalar` passes only a scalar through it.
"""

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu


def _describe(leaf) -> str:
    return f"shape {tuple(leaf.shape)} and dtype {jnp.dtype(leaf.dtype).name}"


def check_vector_field(terms, y0, args, t0) -> None:
    """Raise `ValueError` if the field of an `ODETerm` in `terms` returns other than
    dy/dt shaped like y0."""
    is_ode_term = lambda x: isinstance(x, diffrax.ODETerm)
    for term in jtu.tree_leaves(terms, is_leaf=is_ode_term):
        if is_ode_term(term):
            # Its own output: `ODETerm.vf` broadcasts and promotes it to the state.
            out = eqx.filter_eval_shape(term.vector_field, t0, y0, args)
            check_like_state(out, y0)


def check_like_state(out, y0) -> None:
    """Raise `ValueError` unless `out` (shapes and dtypes) is dy/dt shaped like y0."""
    if jtu.tree_structure(out) != jtu.tree_structure(y0):
        raise ValueError(
            f"The vector field returned a PyTree of structure "
            f"{jtu.tree_structure(out)} for a state y0 of structure "
            f"{jtu.tree_structure(y0)}; it must return dy/dt with the structure of y0."
        )
    outs = jtu.tree_leaves_with_path(out)
    for (path, leaf_out), leaf_y in zip(outs, jtu.tree_leaves(y0), strict=True):
        leaf_y = jnp.asarray(leaf_y)
        if not hasattr(leaf_out, "shape") or leaf_out.shape == ():
            continue  # a scalar, broadcast by Diffrax on purpose
        weak = getattr(leaf_out, "weak_type", False)
        if leaf_out.shape != leaf_y.shape or (
            not weak and leaf_out.dtype != leaf_y.dtype
        ):
            where = f" {jtu.keystr(path)}" if path else ""
            raise ValueError(
                f"The vector field returned {_describe(leaf_out)} for the "
                f"state{where} of {_describe(leaf_y)}; it must return dy/dt with the "
                "state's shape and dtype."
            )


def finite_or_raise(y0, terms, args):
    """`y0`, raising at run time if it or a floating-point array of `terms` or `args`
    holds a NaN or an infinity."""
    arrays = jtu.tree_leaves((y0, args, terms), is_leaf=eqx.is_inexact_array)
    arrays = [x for x in arrays if eqx.is_inexact_array(x)]
    if not arrays:
        return y0
    bad = jnp.any(jnp.stack([~jnp.all(jnp.isfinite(x)) for x in arrays]))
    message = (
        "y0, `args` or the vector field's parameters contain NaN or inf. "
        "(Check the initial state and the parameters, e.g. after a diverged "
        "optimiser step; `diffeqsolve(..., throw=False)` skips this check.)"
    )
    return error_through_scalar(lambda one: eqx.error_if(one, bad, message), y0)


def error_through_scalar(check: Callable, tree):
    """`tree`, raising what `check(x)` (an `eqx.error_if`-like run-time check of a
    scalar x) raises. The floating-point arrays of `tree` are multiplied by the
    checked 1, so that the check is not optimised away."""
    one = check(jnp.ones(()))
    return jtu.tree_map(
        lambda x: x * one.astype(x.dtype) if eqx.is_inexact_array(x) else x, tree
    )


def checked_inputs(init_state, terms, args, t0, throw: bool):
    """`init_state` of a solve, after both checks (the run-time one if `throw`)."""
    check_vector_field(terms, init_state.y, args, t0)
    if not throw:
        return init_state
    y0 = finite_or_raise(init_state.y, terms, args)
    return eqx.tree_at(lambda s: s.y, init_state, y0)
