"""Inputs that a custom-VJP adjoint treats as constants, refused when differentiated.

`SymplecticAdjoint` and `ContinuousAdjoint` differentiate with respect to `y0`, `args`
and the parameters of the terms. The times (`t0`, `t1`, `dt0`, the save times, a
controller's `step_ts` and `jump_ts`) are not inputs of their custom VJP:
differentiating through them makes Equinox raise "Unexpected tangent" deep inside the
solve. `diffrax.BacksolveAdjoint` also treats the data of a control path (a neural
CDE's interpolation coefficients) as constant, and returns a zero gradient for it
without a word. Passed through `constant_times` or `constant_paths` first, each raises
an error at trace time that names the input and an adjoint that differentiates it.

A solve that an adjoint cannot differentiate at all (an implicit solver under
`SymplecticAdjoint`, say) still runs: `forward_only` solves it as Diffrax's default
adjoint does when not differentiated, and only differentiating it raises.
"""

import functools as ft
from typing import Any

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.core
import jax.tree_util as jtu

from . import _diffrax_private as private

_RCA = "`adjoint=diffrax.RecursiveCheckpointAdjoint()`"


@ft.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _constant(message: str, x):
    return x


@_constant.defjvp
def _constant_jvp(message, primals, tangents):
    # JAX calls this only when `x` is perturbed, and while tracing.
    raise NotImplementedError(message)


def _guard(message: str, x):
    if not isinstance(x, jax.core.Tracer):
        return x  # a constant: nothing to differentiate
    return _constant(message, x)


def _guard_time(adjoint: str, what: str, t):
    if t is None:
        return None
    return _guard(
        f"{adjoint} does not compute gradients with respect to {what}. Use {_RCA} "
        f"for that gradient, or pass {what} through `jax.lax.stop_gradient` where "
        "none is wanted.",
        t,
    )


def forward_only(message: str, **loop_kwargs):
    """Diffrax's solve loop with plain while loops (what
    `diffrax.RecursiveCheckpointAdjoint` runs when not differentiated: the same
    values), whose outputs raise `NotImplementedError(message)` at trace time if
    differentiated."""
    lax_while_loop = ft.partial(eqxi.while_loop, kind="lax")
    final_state, aux_stats = private.loop(
        inner_while_loop=lax_while_loop, outer_while_loop=lax_while_loop, **loop_kwargs
    )
    guard = lambda x: _guard(message, x) if eqx.is_inexact_array(x) else x
    return jtu.tree_map(guard, final_state), aux_stats


def first_order_only(adjoint: str, cotangents):
    """`cotangents` (what a custom VJP's backward pass returns) unchanged, except that
    differentiating them again raises a clear error: it would otherwise fail deep
    inside JAX (reverse mode of a while loop), with no word of what to use instead."""
    message = (
        f"{adjoint} computes first derivatives only; its gradient cannot be "
        "differentiated again. Use `adjoint=neuralode.BackpropAdjoint()` or "
        "`diffrax.DirectAdjoint()` for second derivatives (Hessians)."
    )
    guard = lambda x: _guard(message, x) if eqx.is_inexact_array(x) else x
    return jtu.tree_map(guard, cotangents)


def _is_none(x) -> bool:
    return x is None


def constant_times(
    adjoint: str, t0, t1, dt0, saveat, stepsize_controller
) -> tuple[Any, Any, Any, diffrax.SaveAt, diffrax.AbstractStepSizeController]:
    """`(t0, t1, dt0, saveat, stepsize_controller)` unchanged, except that
    differentiating through any of their times raises a clear error."""
    t0 = _guard_time(adjoint, "`t0`", t0)
    t1 = _guard_time(adjoint, "`t1`", t1)
    dt0 = _guard_time(adjoint, "`dt0`", dt0)

    def guard_ts(sub):
        ts = _guard_time(adjoint, "the save times `SaveAt(ts=...)`", sub.ts)
        return eqx.tree_at(lambda s: s.ts, sub, ts, is_leaf=_is_none)

    is_sub = lambda x: isinstance(x, diffrax.SubSaveAt)
    subs = jtu.tree_map(guard_ts, saveat.subs, is_leaf=is_sub)
    saveat = eqx.tree_at(lambda s: s.subs, saveat, subs, is_leaf=_is_none)
    return t0, t1, dt0, saveat, _guard_controller(adjoint, stepsize_controller)


def _guard_controller(adjoint: str, controller):
    if not isinstance(controller, diffrax.ClipStepSizeController):
        return controller
    step_ts = _guard_time(adjoint, "`step_ts`", controller.step_ts)
    jump_ts = _guard_time(adjoint, "`jump_ts`", controller.jump_ts)
    inner = _guard_controller(adjoint, controller.controller)
    return eqx.tree_at(
        lambda c: (c.step_ts, c.jump_ts, c.controller),
        controller,
        (step_ts, jump_ts, inner),
        is_leaf=_is_none,
    )


def constant_paths(adjoint: str, terms):
    """`terms` unchanged, except that differentiating through the data of a control
    path (any `diffrax.AbstractPath` inside them) raises a clear error."""
    message = (
        f"{adjoint} does not compute gradients with respect to the data of a control "
        "path (e.g. the interpolation coefficients of a neural CDE): "
        "diffrax.BacksolveAdjoint would return zero for them. Use "
        f"`adjoint=neuralode.SymplecticAdjoint()` or {_RCA}, or pass them through "
        "`jax.lax.stop_gradient` where no gradient is wanted."
    )
    is_path = lambda x: isinstance(x, diffrax.AbstractPath)

    def guard_path(x):
        if not is_path(x):
            return x
        guard = lambda leaf: _guard(message, leaf) if eqx.is_array(leaf) else leaf
        return jtu.tree_map(guard, x)

    return jtu.tree_map(guard_path, terms, is_leaf=is_path)
