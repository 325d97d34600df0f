"""The symplectic adjoint: the exact gradient of an explicit Runge--Kutta solve in
O(n·d + s·d + m·d) memory.

The gradient of the *discretised* solve is the symplectic partitioned Runge--Kutta
method paired with the forward solver (Sanz-Serna 2016; Matsubara, Miyatake & Yaguchi
2021). Here it is computed as reverse mode of each explicit RK step, stage by stage
(the formula is in `_tableau.py`), on this schedule:

- forward: Diffrax's own solve loop, recording only (t_n, y_n) of each accepted step
  (n·|y| memory, no activations of f), and with `jump_ts` where each step ended;
- backward, steps last to first: recompute the stage increments k_1..k_s of the step
  (s·|y|), pull the cotangent of any `SaveAt(ts=...)` output inside the step back
  through Diffrax's interpolation, then run the s VJPs of f one at a time, so that only
  one evaluation of f has live activations (m·d).

The accepted step sizes are constants of the discretisation (Diffrax's adaptive
controllers stop gradients through their error estimates), so the result equals
`diffrax.RecursiveCheckpointAdjoint` on the same call, to rounding.
"""

import functools as ft

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from . import _diffrax_private as private
from ._closure import closure_convert_terms
from ._tableau import explicit_tableau, pullback_stages, recompute_stages

_lax_while_loop = ft.partial(eqxi.while_loop, kind="lax")


class SymplecticAdjoint(diffrax.AbstractAdjoint):
    """Exact gradients of an explicit Runge--Kutta solve, in memory that grows by one
    state per step.

    Use it as `diffrax.diffeqsolve(..., adjoint=neuralode.SymplecticAdjoint())`. It
    returns the same solution and, to rounding, the same gradients as
    `diffrax.RecursiveCheckpointAdjoint()` with respect to `y0`, `args` and the
    parameters inside `terms`, for every explicit RK solver (Euler, Heun, Midpoint,
    Ralston, Bosh3, Tsit5, Dopri5, Dopri8, or a `diffrax.AbstractERK` with your own
    `ButcherTableau`), with constant or adaptive steps (`step_ts` and `jump_ts`
    included), `SaveAt(t0=..., t1=..., ts=...)` and integration in either direction.
    SDEs solved by an explicit RK solver over a fixed Brownian path (e.g.
    `diffrax.VirtualBrownianTree`) are covered by the same formula.

    Memory: the forward pass stores (t_n, y_n) for `max_steps` steps, so keep
    `max_steps` near the number of steps needed; the backward pass holds one step's
    stages and one evaluation of f's activations. Compute: each step's stages are
    evaluated three times (forward, recompute, and inside their VJP).

    !!! warning

        Reverse mode only, first order only: under `jax.jvp`/`jax.jacfwd` JAX raises
        "can't apply forward-mode autodiff (jvp) to a custom_vjp function", and
        differentiating the gradient again (a Hessian) raises `NotImplementedError`.
        Use `diffrax.ForwardMode()` or `diffrax.DirectAdjoint()` (or
        `neuralode.BackpropAdjoint()`) for forward mode and second derivatives.
        Events, implicit solvers, solvers that override Diffrax's RK step,
        `SaveAt(dense=True)`, `SaveAt(steps=...)`, `SaveAt(fn=...)`,
        `SaveAt(subs=...)`, `SaveAt(solver_state=True)`,
        `SaveAt(controller_state=True)`, a passed `solver_state` and
        `max_steps=None` are refused with an error that names an alternative.
        Gradients with respect to `t0`, `t1`, `dt0` or `SaveAt(ts=...)` are not
        computed: Equinox raises "Unexpected tangent" (use
        `diffrax.RecursiveCheckpointAdjoint()` for those). Arrays the vector field
        closes over are differentiated like parameters held in `terms`.

    ??? cite "References"

        ```bibtex
        @inproceedings{matsubara2021symplectic,
            title = {The Symplectic Adjoint Method: Memory-Efficient Backpropagation of
                     Neural-Network-Based Differential Equations},
            author = {Matsubara, Takashi and Miyatake, Yuto and Yaguchi, Takaharu},
            booktitle = {Advances in Neural Information Processing Systems},
            year = {2021},
            note = {Extended in IEEE Trans. Neural Netw. Learn. Syst., 2023,
                    doi:10.1109/TNNLS.2023.3242345},
        }

        @article{sanzserna2016symplectic,
            title = {Symplectic Runge--Kutta Schemes for Adjoint Equations, Automatic
                     Differentiation, Optimal Control, and More},
            author = {Sanz-Serna, J. M.},
            journal = {SIAM Review},
            volume = {58},
            number = {1},
            pages = {3--33},
            year = {2016},
        }
        ```
    """

    def loop(
        self,
        *,
        args,
        terms,
        solver,
        event,
        saveat,
        max_steps,
        throw,
        init_state,
        passed_solver_state,
        passed_controller_state,
        **kwargs,
    ):
        del throw
        _check_supported(terms, solver, event, saveat, max_steps, passed_solver_state)
        y0 = init_state.y
        terms = closure_convert_terms(terms, init_state.tprev, y0, args)
        init_state = eqx.tree_at(lambda s: s.y, init_state, object())
        init_state = private.nondiff_solver_controller_state(
            self, init_state, passed_solver_state, passed_controller_state
        )
        final_state, aux_stats = _symplectic_loop(
            (y0, args, terms),
            solver=solver,
            event=event,
            saveat=saveat,
            max_steps=max_steps,
            init_state=init_state,
            **kwargs,
        )
        return private.only_transpose_ys(final_state), aux_stats


def _refuse(what: str, instead: str) -> NotImplementedError:
    return NotImplementedError(
        f"SymplecticAdjoint does not support {what}. Use {instead} instead."
    )


def _check_supported(terms, solver, event, saveat, max_steps, passed_solver_state):
    """Refuse, at trace time, everything this adjoint would not differentiate exactly."""
    rca = "`adjoint=diffrax.RecursiveCheckpointAdjoint()`"
    if event is not None:
        raise _refuse("events (`diffeqsolve(..., event=...)`)", rca)
    if max_steps is None:
        raise ValueError(
            "SymplecticAdjoint needs `diffeqsolve(..., max_steps=<int>)`: it records "
            "every step, so it must know how many to allocate."
        )
    tableau = explicit_tableau(solver)
    if tableau is None:
        raise _refuse(
            f"the solver {type(solver).__name__}: only explicit Runge--Kutta solvers "
            "(Euler, Heun, Midpoint, Ralston, Bosh3, Tsit5, Dopri5, Dopri8, or a "
            "diffrax.AbstractERK subclass with a ButcherTableau that keeps Diffrax's "
            "own `init`, `func` and `step`) take the steps it pulls back",
            rca,
        )
    if jtu.tree_structure(saveat.subs, is_leaf=_is_subsaveat) != jtu.tree_structure(0):
        raise _refuse("`SaveAt(subs=...)`", rca)
    if saveat.dense:
        raise _refuse("`SaveAt(dense=True)`", rca)
    if saveat.solver_state or saveat.controller_state:
        # Their cotangents would be dropped, not pulled back.
        raise _refuse(
            "`SaveAt(solver_state=True)` or `SaveAt(controller_state=True)`", rca
        )
    if saveat.subs.steps:
        raise _refuse(
            "`SaveAt(steps=...)`", f"`SaveAt(ts=...)` at the times you need, or {rca}"
        )
    if saveat.subs.fn is not private.save_y:
        raise _refuse("`SaveAt(fn=...)`", f"a function of the returned `ys`, or {rca}")
    if private.is_unsafe_sde(terms):
        raise _refuse("`UnsafeBrownianPath`", "`diffrax.VirtualBrownianTree`")
    if passed_solver_state:
        raise _refuse(
            "a passed `solver_state` (it recomputes each step from its start)", rca
        )


def _has_jump_ts(controller) -> bool:
    while isinstance(controller, diffrax.ClipStepSizeController):
        if controller.jump_ts is not None:
            return True
        controller = controller.controller
    return False


class _RecordStepEnds(diffrax.AbstractStepSizeController):
    """`controller`, also recording where each accepted step really ended.

    With `jump_ts`, a step that ends just before a jump is followed by one that starts
    just after it, and the loop records the latter time (the next step's start) as the
    step's. Its recomputation must end where the step did, on the same side of the jump.
    """

    controller: diffrax.AbstractStepSizeController

    def wrap(self, direction):
        return self

    def init(self, *args, **kwargs):
        raise AssertionError("the loop receives an initialised state")

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, order, state):
        inner_state, ends, index = state
        keep, *rest, inner_state, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, order, inner_state
        )
        ends = ends.at[index].set(jnp.where(keep, t1, ends[index]))
        return keep, *rest, (inner_state, ends, index + keep), result


def _is_subsaveat(x) -> bool:
    return isinstance(x, diffrax.SubSaveAt)


def _run_loop(
    y0,
    args,
    terms,
    *,
    init_state,
    saveat,
    max_steps,
    stepsize_controller,
    record,
    **kwargs,
):
    init_state = eqx.tree_at(lambda s: s.y, init_state, y0)
    record_ends = record and _has_jump_ts(stepsize_controller)
    if record_ends:
        stepsize_controller = _RecordStepEnds(stepsize_controller)
        ends = jnp.full(max_steps, jnp.inf, dtype=jnp.result_type(init_state.tprev))
        init_state = eqx.tree_at(
            lambda s: s.controller_state,
            init_state,
            (init_state.controller_state, ends, jnp.zeros((), jnp.int32)),
        )
    if record:
        # One extra output that saves (t, y) at every accepted step.
        saveat = eqx.tree_at(
            lambda s: s.subs, saveat, (saveat.subs, diffrax.SubSaveAt(steps=True))
        )
        time_dtype = jnp.result_type(init_state.tprev)
        steps = private.SaveState(
            saveat_ts_index=0,
            ts=jnp.full(max_steps, jnp.inf, dtype=time_dtype),
            ys=jtu.tree_map(
                lambda y: jnp.full((max_steps, *y.shape), jnp.inf, y.dtype), y0
            ),
            save_index=0,
        )
        init_state = eqx.tree_at(
            lambda s: s.save_state, init_state, (init_state.save_state, steps)
        )
    final_state, aux_stats = private.loop(
        args=args,
        terms=terms,
        init_state=init_state,
        saveat=saveat,
        max_steps=max_steps,
        stepsize_controller=stepsize_controller,
        inner_while_loop=_lax_while_loop,
        outer_while_loop=_lax_while_loop,
        **kwargs,
    )
    if not record:
        return final_state, aux_stats, None
    save_state, steps = final_state.save_state
    final_state = eqx.tree_at(lambda s: s.save_state, final_state, save_state)
    # (t_n, y_n) as the loop records them, and where each step really ended.
    step_ends = steps.ts
    if record_ends:
        controller_state, step_ends, _ = final_state.controller_state
        final_state = eqx.tree_at(
            lambda s: s.controller_state, final_state, controller_state
        )
    return final_state, aux_stats, (steps, step_ends)


@eqx.filter_custom_vjp
def _symplectic_loop(y__args__terms, **kwargs):
    final_state, aux_stats, _ = _run_loop(*y__args__terms, record=False, **kwargs)
    return final_state, aux_stats


@_symplectic_loop.def_fwd
def _symplectic_loop_fwd(perturbed, y__args__terms, **kwargs):
    del perturbed
    final_state, aux_stats, (steps, step_ends) = _run_loop(
        *y__args__terms, record=True, **kwargs
    )
    return (final_state, aux_stats), (steps.ts, step_ends, steps.ys, steps.save_index)


@_symplectic_loop.def_bwd
def _symplectic_loop_bwd(
    residuals,
    grad_final_state__aux_stats,
    perturbed,
    y__args__terms,
    *,
    solver,
    saveat,
    t0,
    **kwargs,
):
    del perturbed, kwargs
    tableau = explicit_tableau(solver)
    step_ts, step_ends, step_ys, num_steps = residuals
    y0, args, terms = y__args__terms
    sub = saveat.subs
    save_ts = sub.ts
    num_ts = 0 if save_ts is None else len(save_ts)
    ts_offset = int(sub.t0)
    num_saved = ts_offset + num_ts + int(sub.t1)
    grad_ys = _materialise(grad_final_state__aux_stats[0].save_state.ys, y0, num_saved)

    diff_args, static_args = eqx.partition(args, eqx.is_inexact_array)
    diff_terms, static_terms = eqx.partition(terms, eqx.is_inexact_array)
    params = (diff_args, diff_terms)

    def vf_prod(params, t, y, t_start, t_end):
        _args = eqx.combine(params[0], static_args)
        _terms = eqx.combine(params[1], static_terms)
        return _terms.vf_prod(t, y, _args, _terms.contr(t_start, t_end))

    # y_{n+1} may not need the last stage (FSAL); interpolating a save needs every one.
    solution_stages = tableau.stages_for_solution()
    num_stages = tableau.num_stages if num_ts else solution_stages
    is_euler = type(solver) is diffrax.Euler

    def interpolate(t_start, t_end, y_start, y_end, ks, t):
        info = (
            dict(y0=y_start, y1=y_end) if is_euler else dict(y0=y_start, y1=y_end, k=ks)
        )
        return solver.interpolation_cls(t0=t_start, t1=t_end, **info).evaluate(t)

    def step_back(carry):
        n, ts_index, lam, params_bar = carry
        prev = jnp.maximum(n - 1, 0)
        t_start = jnp.where(n == 0, t0, step_ts[prev])
        t_end = step_ends[n]  # step_ts[n] but at a jump (see `_RecordStepEnds`)
        y_start = jtu.tree_map(
            lambda a, buf: jnp.where(n == 0, a, buf[prev]), y0, step_ys
        )
        y_end = jtu.tree_map(lambda buf: buf[n], step_ys)

        # Diffrax saves ts[j] in the first step with ts[j] <= t_end.
        def has_save(c):
            j = c[0]
            return (j >= 0) & ((save_ts[jnp.maximum(j, 0)] > t_start) | (n == 0))

        if num_ts:
            saves_here = has_save((ts_index,))
            num_pulled = jnp.where(saves_here, num_stages, solution_stages)
            num_computed = jnp.where(saves_here, num_stages, solution_stages - 1)
        else:
            num_pulled = num_stages
            # The stage pullback needs every k but the last.
            num_computed = num_stages - 1
        ks = recompute_stages(
            tableau,
            num_stages,
            lambda t, y: vf_prod(params, t, y, t_start, t_end),
            t_start,
            t_end,
            y_start,
            num_computed=num_computed,
        )
        y_start_bar = jtu.tree_map(jnp.zeros_like, y0)
        k_bar = jtu.tree_map(jnp.zeros_like, ks)
        if num_ts:

            def pull_save(c):
                j, y_start_bar, lam, k_bar = c
                g = jtu.tree_map(lambda gy: gy[ts_offset + j], grad_ys)
                _, vjp = jax.vjp(
                    lambda ya, yb, k: interpolate(
                        t_start, t_end, ya, yb, k, save_ts[j]
                    ),
                    y_start,
                    y_end,
                    ks,
                )
                ya_bar, yb_bar, kk_bar = vjp(g)
                add = ft.partial(jtu.tree_map, jnp.add)
                return (
                    j - 1,
                    add(y_start_bar, ya_bar),
                    add(lam, yb_bar),
                    add(k_bar, kk_bar),
                )

            ts_index, y_start_bar, lam, k_bar = lax.while_loop(
                has_save, pull_save, (ts_index, y_start_bar, lam, k_bar)
            )
        b = jnp.asarray(tableau.b[:num_stages])
        k_bar = jtu.tree_map(
            lambda kb, lm: kb + b.astype(lm.dtype)[(...,) + (None,) * lm.ndim] * lm,
            k_bar,
            lam,
        )

        def vf_prod_vjp(t, y, cotangent):
            _, vjp = jax.vjp(
                lambda y_, p_: vf_prod(p_, t, y_, t_start, t_end), y, params
            )
            return vjp(cotangent)

        y_bar_sum, params_bar = pullback_stages(
            tableau,
            num_stages,
            vf_prod_vjp,
            t_start,
            t_end,
            y_start,
            ks,
            k_bar,
            params_bar,
            num_pulled=num_pulled,
        )
        lam = jtu.tree_map(lambda *x: sum(x), lam, y_bar_sum, y_start_bar)
        return n - 1, ts_index, lam, params_bar

    if sub.t1:
        lam = jtu.tree_map(lambda g: g[num_saved - 1], grad_ys)
    else:
        lam = jtu.tree_map(jnp.zeros_like, y0)
    params_bar = jtu.tree_map(jnp.zeros_like, params)
    carry = (num_steps - 1, num_ts - 1, lam, params_bar)
    _, ts_index, y0_bar, params_bar = lax.while_loop(
        lambda c: c[0] >= 0, step_back, carry
    )

    if num_ts:
        # Saves not inside any step: t0 == t1, where Diffrax saves y0 at every ts.
        leftover = jnp.arange(num_ts) <= ts_index
        y0_bar = jtu.tree_map(
            lambda yb, g: (
                yb
                + jnp.sum(
                    jnp.where(
                        leftover[(...,) + (None,) * yb.ndim],
                        g[ts_offset : ts_offset + num_ts],
                        0,
                    ),
                    axis=0,
                )
            ),
            y0_bar,
            grad_ys,
        )
    if sub.t0:
        y0_bar = jtu.tree_map(lambda yb, g: yb + g[0], y0_bar, grad_ys)
    return jtu.tree_map(_first_order_only, (y0_bar, params_bar[0], params_bar[1]))


@jax.custom_jvp
def _first_order_only(cotangent):
    return cotangent


@_first_order_only.defjvp
def _first_order_only_jvp(primals, tangents):
    # Differentiating the gradient would otherwise fail deep inside JAX (reverse mode
    # of a while loop), with no word of what to use instead.
    raise NotImplementedError(
        "SymplecticAdjoint computes first derivatives only; its gradient cannot be "
        "differentiated again. Use `adjoint=neuralode.BackpropAdjoint()` or "
        "`diffrax.DirectAdjoint()` for second derivatives (Hessians)."
    )


def _materialise(grad_ys, y0, num_saved):
    """Zeros where JAX passed a symbolic-zero (`None`) cotangent."""
    zeros = lambda y: jnp.zeros((num_saved, *jnp.shape(y)), jnp.result_type(y))
    if grad_ys is None:
        return jtu.tree_map(zeros, y0)
    return jtu.tree_map(
        lambda g, y: zeros(y) if g is None else g,
        grad_ys,
        y0,
        is_leaf=lambda x: x is None,
    )
