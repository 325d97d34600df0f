"""Times that a custom-VJP adjoint treats as constants.

`SymplecticAdjoint` and `ContinuousAdjoint` differentiate with respect to `y0`, `args`
and the terms only; `t0`, `t1`, `dt0` and the save times are not inputs of their custom
VJP. Differentiating through them would make Equinox raise "Unexpected tangent" deep
inside the solve. Passed through `constant_times` first, they raise an error that
names the time and the adjoint that does differentiate it.
"""

import functools as ft

import diffrax
import equinox as eqx
import jax
import jax.tree_util as jtu


@ft.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _constant(message: str, t):
    return t


@_constant.defjvp
def _constant_jvp(message, primals, tangents):
    # JAX calls this only when `t` is perturbed, and while tracing.
    raise NotImplementedError(message)


def _guard(adjoint: str, what: str, t):
    if not isinstance(t, jax.core.Tracer):
        return t  # a constant: nothing to differentiate
    return _constant(
        f"{adjoint} does not compute gradients with respect to {what}. Use "
        "`adjoint=diffrax.RecursiveCheckpointAdjoint()` for that gradient, or pass "
        f"{what} through `jax.lax.stop_gradient` where none is wanted.",
        t,
    )


def constant_times(adjoint: str, t0, t1, dt0, saveat: diffrax.SaveAt):
    """`(t0, t1, dt0, saveat)` unchanged, except that differentiating through any of
    the times raises a clear error at trace time."""
    t0 = _guard(adjoint, "`t0`", t0)
    t1 = _guard(adjoint, "`t1`", t1)
    if dt0 is not None:
        dt0 = _guard(adjoint, "`dt0`", dt0)

    def guard_ts(sub):
        if sub.ts is None:
            return sub
        ts = _guard(adjoint, "the save times `SaveAt(ts=...)`", sub.ts)
        return eqx.tree_at(lambda s: s.ts, sub, ts)

    is_sub = lambda x: isinstance(x, diffrax.SubSaveAt)
    subs = jtu.tree_map(guard_ts, saveat.subs, is_leaf=is_sub)
    return t0, t1, dt0, eqx.tree_at(lambda s: s.subs, saveat, subs, is_leaf=_is_none)


def _is_none(x) -> bool:
    return x is None
