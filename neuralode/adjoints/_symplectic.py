"""The symplectic adjoint: the exact gradient of an explicit Runge--Kutta solve in
O(n·d + s·d + m·d) memory.

The gradient of the *discretised* solve is the symplectic partitioned Runge--Kutta
method paired with the forward solver (Sanz-Serna 2016; Matsubara, Miyatake & Yaguchi
2021). Here it is computed as reverse mode of each explicit RK step, stage by stage
(the formula is in `_tableau.py`), on this schedule:

- forward: Diffrax's own solve loop, recording only (t_n, y_n) of each accepted step
  (n·|y| memory, no activations of f), and with `jump_ts` where each step ended;
- backward, steps last to first: recompute the stage increments k_1..k_s of the step
  (s·|y|); add to λ = ∂L/∂y_{n+1} the cotangent of a save at the step's end, and pull
  that of any `SaveAt(ts=...)` save inside the step back through Diffrax's
  interpolation (each through its `SaveAt(fn=...)`, whose VJP also gives ∂L/∂args and
  the cotangent of what `fn` holds), and add the cotangent of the step's dense output
  (y_n, y_{n+1}, k_1..k_s) to those of y_n, λ and the stages, and in the last step
  that of an event time found by a root finder (implicit function theorem); then run
  the s VJPs of f one at a time, so that only one evaluation of f has live
  activations (m·d).

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
from ._closure import closure_convert_event, closure_convert_fn, closure_convert_terms
from ._constant_inputs import constant_times, forward_only
from ._tableau import (
    explicit_tableau,
    outer_weights,
    pullback_stages,
    recompute_stages,
)

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
    included), every `SaveAt` of `t0`, `t1`, `ts` and `steps` (also through `fn=...`
    and `subs=...`; `fn` may hold or close over parameters, which get their
    gradients), dense output (`SaveAt(dense=True)`, `sol.evaluate(t)`) and
    integration in either direction.
    SDEs solved by an explicit RK solver over a fixed Brownian path (e.g.
    `diffrax.VirtualBrownianTree`) and neural CDEs (`diffrax.ControlTerm` over an
    interpolation, whose coefficients get gradients) are covered by the same formula.

    Memory: the forward pass stores (t_n, y_n) for `max_steps` steps, so keep
    `max_steps` near the number of steps needed; the backward pass holds one step's
    stages and one evaluation of f's activations. Dense output is itself s + 2 states
    per step (Diffrax stores each step's y_n, y_{n+1} and stages), and so is its
    cotangent: with `SaveAt(dense=True)` that, not the adjoint, dominates memory.
    Compute: each step's stages are evaluated three times (forward, recompute, and
    inside their VJP).

    Events: without a root finder the solve stops at the end of the step on which the
    event triggers, and the gradient is that of the steps taken (which step that is
    does not change under a small perturbation). With a root finder it stops at the
    event time t*, found on the last step's interpolation, and t* (saved in `sol.ts`)
    is differentiated too, through the condition and whatever it closes over; that
    needs `SaveAt` of `t0`, `t1` and `ts` only (Diffrax rewrites the last step's
    `steps` and dense saves after the root find).

    !!! warning

        Reverse mode only, first order only: under `jax.jvp`/`jax.jacfwd` JAX raises
        "can't apply forward-mode autodiff (jvp) to a custom_vjp function", and
        differentiating the gradient again (a Hessian) raises `NotImplementedError`.
        Use `diffrax.ForwardMode()` or `diffrax.DirectAdjoint()` (or
        `neuralode.BackpropAdjoint()`) for forward mode and second derivatives.
        Events with a root finder beside `SaveAt(steps=...)` or
        `SaveAt(dense=True)`, implicit and stochastic RK solvers, solvers that
        override Diffrax's RK step, `SaveAt(solver_state=True)`,
        `SaveAt(controller_state=True)`, a passed `solver_state` and
        `max_steps=None` are solved as by Diffrax's default adjoint, but
        differentiating such a solve raises an error that names an alternative.
        Gradients with respect to `t0`, `t1`, `dt0`, `SaveAt(ts=...)`, `step_ts` or
        `jump_ts` are not computed: differentiating through them raises
        `NotImplementedError` (use
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
        t0,
        t1,
        dt0,
        max_steps,
        throw,
        init_state,
        passed_solver_state,
        passed_controller_state,
        **kwargs,
    ):
        del throw
        t0, t1, dt0, saveat, kwargs["stepsize_controller"] = constant_times(
            "SymplecticAdjoint", t0, t1, dt0, saveat, kwargs["stepsize_controller"]
        )
        unsupported = _unsupported(
            terms, solver, event, saveat, max_steps, passed_solver_state
        )
        if unsupported is not None:
            return forward_only(
                unsupported,
                args=args,
                terms=terms,
                solver=solver,
                event=event,
                saveat=saveat,
                t0=t0,
                t1=t1,
                dt0=dt0,
                max_steps=max_steps,
                init_state=init_state,
                **kwargs,
            )
        y0 = init_state.y
        t = init_state.tprev
        # An event's `cond_fn` may close over parameters too (e.g. a threshold), which
        # the event time found by a root finder depends on.
        event = closure_convert_event(
            event,
            t,
            y0,
            args,
            terms=terms,
            solver=solver,
            t0=t0,
            t1=t1,
            dt0=dt0,
            saveat=saveat,
            stepsize_controller=kwargs["stepsize_controller"],
            max_steps=max_steps,
        )
        terms = closure_convert_terms(terms, t, y0, args)
        # Each `SaveAt(fn=...)` is differentiated too (it may hold or close over
        # parameters), so it travels with the differentiable inputs.
        fns = tuple(closure_convert_fn(sub.fn, t, y0, args) for sub in _subs(saveat))
        saveat = _with_fns(saveat, (private.save_y,) * len(fns))
        init_state = eqx.tree_at(lambda s: s.y, init_state, object())
        init_state = private.nondiff_solver_controller_state(
            self, init_state, passed_solver_state, passed_controller_state
        )
        # The event's first values (at t0) matter only through their signs.
        init_state = eqx.tree_at(
            lambda s: s.event_values,
            init_state,
            replace_fn=lax.stop_gradient,
            is_leaf=_is_none,
        )
        final_state, aux_stats = _symplectic_loop(
            (y0, args, terms, fns, event),
            solver=solver,
            saveat=saveat,
            t0=t0,
            t1=t1,
            dt0=dt0,
            max_steps=max_steps,
            init_state=init_state,
            **kwargs,
        )
        transposed = private.only_transpose_ys(final_state)
        if _finds_root(event):
            # The event time, saved as the last `ts` entry, depends on the parameters.
            save_ts = lambda s: [x.ts for x in _per_sub(saveat, s.save_state)]
            transposed = eqx.tree_at(save_ts, transposed, save_ts(final_state))
        if saveat.dense:
            # Dense output is pulled back too: each step's (y0, y1, k) is a function
            # of the step's start and stages.
            transposed = eqx.tree_at(
                lambda s: s.dense_infos, transposed, final_state.dense_infos
            )
        return transposed, aux_stats


def _unsupported(terms, solver, event, saveat, max_steps, passed_solver_state):
    """Why this adjoint cannot differentiate the solve exactly, with an alternative,
    or `None`. (A solve that is not differentiated runs whatever the answer.)"""
    rca = "`adjoint=diffrax.RecursiveCheckpointAdjoint()`"
    if _finds_root(event) and (saveat.dense or any(sub.steps for sub in _subs(saveat))):
        # Diffrax then rewrites the last step's saves after the root find.
        return _refusal(
            "an event with a root finder together with `SaveAt(steps=...)` or "
            "`SaveAt(dense=True)`",
            f"`SaveAt(t0=..., t1=..., ts=...)`, `root_finder=None` or {rca}",
        )
    if max_steps is None:
        return (
            "SymplecticAdjoint needs `diffeqsolve(..., max_steps=<int>)` to be "
            "differentiated: it records every step, so it must know how many to "
            "allocate."
        )
    if explicit_tableau(solver) is None:
        return _refusal(
            f"the solver {type(solver).__name__}: only explicit Runge--Kutta solvers "
            "(Euler, Heun, Midpoint, Ralston, Bosh3, Tsit5, Dopri5, Dopri8, or a "
            "diffrax.AbstractERK subclass with a ButcherTableau that keeps Diffrax's "
            "own `init`, `func` and `step`) take the steps it pulls back",
            rca,
        )
    if saveat.solver_state or saveat.controller_state:
        # Their cotangents would be dropped, not pulled back.
        return _refusal(
            "`SaveAt(solver_state=True)` or `SaveAt(controller_state=True)`", rca
        )
    if private.is_unsafe_sde(terms):
        return _refusal("`UnsafeBrownianPath`", "`diffrax.VirtualBrownianTree`")
    if passed_solver_state:
        return _refusal(
            "a passed `solver_state` (it recomputes each step from its start)", rca
        )
    return None


def _refusal(what: str, instead: str) -> str:
    return (
        f"SymplecticAdjoint cannot differentiate a solve with {what}. Use {instead} "
        "instead. (Solving without differentiating works as with any adjoint.)"
    )


def _finds_root(event) -> bool:
    return event is not None and event.root_finder is not None


def _is_subsaveat(x) -> bool:
    return isinstance(x, diffrax.SubSaveAt)


def _subs(saveat: diffrax.SaveAt) -> list[diffrax.SubSaveAt]:
    return jtu.tree_leaves(saveat.subs, is_leaf=_is_subsaveat)


def _is_none(x) -> bool:
    return x is None


def _with_fns(saveat: diffrax.SaveAt, fns) -> diffrax.SaveAt:
    """`saveat` with the `fn` of each of its `SubSaveAt`s replaced, in order."""
    if saveat.subs is None:
        return saveat
    subs = [
        eqx.tree_at(lambda sub: sub.fn, sub, fn)
        for sub, fn in zip(_subs(saveat), fns, strict=True)
    ]
    treedef = jtu.tree_structure(saveat.subs, is_leaf=_is_subsaveat)
    return eqx.tree_at(lambda s: s.subs, saveat, jtu.tree_unflatten(treedef, subs))


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
        return (
            keep,
            *rest,
            (inner_state, ends, jnp.where(keep, index + 1, index)),
            result,
        )


def _run_loop(
    y0,
    args,
    terms,
    fns,
    event,
    *,
    init_state,
    saveat,
    max_steps,
    stepsize_controller,
    record,
    **kwargs,
):
    init_state = eqx.tree_at(lambda s: s.y, init_state, y0)
    saveat = _with_fns(saveat, fns)
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
        # (`SaveAt(dense=True)` alone has no other output: its `subs` are `None`.)
        saveat = eqx.tree_at(
            lambda s: s.subs,
            saveat,
            (saveat.subs, diffrax.SubSaveAt(steps=True)),
            is_leaf=_is_none,
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
            lambda s: s.save_state,
            init_state,
            (init_state.save_state, steps),
            is_leaf=_is_none,
        )
    final_state, aux_stats = private.loop(
        args=args,
        terms=terms,
        event=event,
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
    final_state = eqx.tree_at(
        lambda s: s.save_state, final_state, save_state, is_leaf=_is_none
    )
    # (t_n, y_n) as the loop records them, and where each step really ended (`None`:
    # where the loop records it).
    step_ends = None
    if record_ends:
        controller_state, step_ends, _ = final_state.controller_state
        final_state = eqx.tree_at(
            lambda s: s.controller_state, final_state, controller_state
        )
    return final_state, aux_stats, (steps, step_ends)


@eqx.filter_custom_vjp
def _symplectic_loop(inputs, **kwargs):
    final_state, aux_stats, _ = _run_loop(*inputs, record=False, **kwargs)
    return final_state, aux_stats


@_symplectic_loop.def_fwd
def _symplectic_loop_fwd(perturbed, inputs, *, saveat, **kwargs):
    del perturbed
    final_state, aux_stats, (steps, step_ends) = _run_loop(
        *inputs, record=True, saveat=saveat, **kwargs
    )
    # How many of each output's `ts` were saved: all, unless the solve stopped early
    # (`throw=False`, an event).
    num_ts_saved = tuple(
        save_state.saveat_ts_index
        for save_state in _per_sub(saveat, final_state.save_state)
    )
    num_steps = steps.save_index
    step_ts, step_ys = steps.ts, steps.ys
    event_root = None
    if _finds_root(inputs[4]):
        # Diffrax has replaced the record of the last step by the save at the event
        # time (t*, y*), or repeated it after the last step if no event happened. The
        # step itself is restored from the event's record of it.
        num_steps = final_state.num_accepted_steps
        last = jnp.maximum(num_steps - 1, 0)
        star = jnp.maximum(steps.save_index - 1, 0)
        event_root = (
            steps.ts[star],
            _index(steps.ys, star),
            ft.reduce(jnp.logical_or, jtu.tree_leaves(final_state.event_mask)),
            final_state.event_mask,
        )
        step_ts = step_ts.at[last].set(final_state.event_tnext)
        step_ys = jtu.tree_map(
            lambda buf, y1: buf.at[last].set(y1),
            step_ys,
            final_state.event_dense_info["y1"],
        )
    residuals = (step_ts, step_ends, step_ys, num_steps, num_ts_saved, event_root)
    return (final_state, aux_stats), residuals


def _per_sub(saveat: diffrax.SaveAt, tree) -> list:
    """`tree` (shaped like the solve's outputs) as a list, one entry per `SubSaveAt`."""
    return jtu.tree_structure(saveat.subs, is_leaf=_is_subsaveat).flatten_up_to(tree)


_add = ft.partial(jtu.tree_map, jnp.add)


def _add_cotangent(x, g):
    """`x + g`, where `g` may be or hold `None` (a symbolic zero)."""
    if g is None:
        return x
    return jtu.tree_map(lambda a, b: a if b is None else a + b, x, g)


def _index(tree, i):
    return jtu.tree_map(lambda buf: buf[i], tree)


@_symplectic_loop.def_bwd
def _symplectic_loop_bwd(
    residuals,
    grad_final_state__aux_stats,
    perturbed,
    inputs,
    *,
    solver,
    saveat,
    t0,
    t1,
    max_steps,
    **kwargs,
):
    del perturbed, kwargs
    tableau = explicit_tableau(solver)
    step_ts, step_ends, step_ys, num_steps, num_ts_saved, event_root = residuals
    if step_ends is None:
        step_ends = step_ts
    y0, args, terms, fns, event = inputs
    # Everything differentiable: args, the terms' parameters, those of each `fn` and
    # those of the event's condition.
    params, static = eqx.partition((args, terms, fns, event), eqx.is_inexact_array)

    def vf_prod(params, t, y, t_start, t_end):
        _args, _terms, _, _ = eqx.combine(params, static)
        return _terms.vf_prod(t, y, _args, _terms.contr(t_start, t_end))

    # y_{n+1} may not need the last stage (FSAL); interpolating a save needs every one.
    solution_stages = tableau.stages_for_solution()
    is_euler = type(solver) is diffrax.Euler

    def interpolate(t_start, t_end, y_start, y_end, ks, t):
        info = (
            dict(y0=y_start, y1=y_end) if is_euler else dict(y0=y_start, y1=y_end, k=ks)
        )
        return solver.interpolation_cls(t0=t_start, t1=t_end, **info).evaluate(t)

    grad_saved = _per_sub(saveat, grad_final_state__aux_stats[0].save_state)
    outputs = [
        _Output(i, sub, fns[i], grad.ys, t0, y0, args, max_steps)
        for i, (sub, grad) in enumerate(zip(_subs(saveat), grad_saved, strict=True))
    ]
    # With t0 == t1 no step is taken and Diffrax saves fn(t0, y0, args) at every ts
    # without counting them.
    num_ts_saved = [
        jnp.where(t0 == t1, out.num_ts, saved)
        for out, saved in zip(outputs, num_ts_saved, strict=True)
    ]
    saves_ts = [out for out in outputs if out.num_ts]
    # The cotangent of each step's dense output dict(y0, y1, k), if the loss used it.
    dense_bar = grad_final_state__aux_stats[0].dense_infos if saveat.dense else None
    if not jtu.tree_leaves(dense_bar):
        dense_bar = None
    # Interpolation (of saves, of dense output, to the event time) needs every stage.
    every_stage = bool(saves_ts) or dense_bar is not None or event_root is not None
    num_stages = tableau.num_stages if every_stage else solution_stages

    def pull_value(out, t, y_of, primals, g, params_bar, of_t=False):
        """Cotangents of `primals` from the cotangent `g` of the saved value
        `fn(t, y_of(*primals), args)` of `out`; those of `args` and of `fn` are added to
        `params_bar`. With `of_t`, `t` is the first of `primals`, a variable too."""
        if out.saves_y:
            if of_t:  # y_of(t, y) = y
                return (jnp.zeros_like(t), g), params_bar
            _, vjp = jax.vjp(y_of, *primals)
            return vjp(g), params_bar

        def value(params, *primals):
            _args, _, _fns, _ = eqx.combine(params, static)
            if of_t:
                t_, *primals = primals
                return _fns[out.index](t_, y_of(*primals), _args)
            return _fns[out.index](t, y_of(*primals), _args)

        _, vjp = jax.vjp(value, params, *primals)
        params_bar_value, *primals_bar = vjp(g)
        return tuple(primals_bar), _add(params_bar, params_bar_value)

    def pull_value_if(pred, out, t, y, g, params_bar):
        """`pull_value` of a save at (t, y) that happened if `pred` (may be traced)."""
        if pred is True:
            (y_bar,), params_bar = pull_value(out, t, _identity, (y,), g, params_bar)
            return y_bar, params_bar
        return lax.cond(
            pred,
            lambda p: pull_value_if(True, out, t, y, g, p),
            lambda p: (jtu.tree_map(jnp.zeros_like, y), p),
            params_bar,
        )

    def pull_event_time(
        t_start, t_end, y_start, y_end, ks, y_start_bar, lam, k_bar, params_bar
    ):
        """Add the cotangents of y* = y(t*) and of the event time t* to those of the
        last step's (y_n, y_{n+1}, k) and of the parameters θ. y* is interpolated in
        the step, and t* is a root of the triggered condition φ(t) = c(t, y(t)) there,
        so dt* = -(∂φ/∂(y_n, y_{n+1}, k, θ)) / (∂φ/∂t) (implicit function theorem).
        (t*, the cotangents of y* and t*, and the event's mask are set below, before
        the loop over the steps runs.)"""

        def y_at(t, y_start, y_end, ks):
            return interpolate(t_start, t_end, y_start, y_end, ks, t)

        def condition(t, y_start, y_end, ks, params):
            _args, _, _, _event = eqx.combine(params, static)
            y = y_at(t, y_start, y_end, ks)
            cond_fns = jtu.tree_leaves(_event.cond_fn, is_leaf=callable)
            value = 0.0
            for mask, cond_fn in zip(
                jtu.tree_leaves(event_mask), cond_fns, strict=True
            ):
                value_i = cond_fn(t, y, _args)
                if jnp.issubdtype(jnp.result_type(value_i), jnp.bool_):
                    value_i = t_end - t  # Diffrax's root for a boolean condition
                value = value + jnp.where(mask, value_i, 0.0)
            return value

        primals = (y_start, y_end, ks)
        _, y_at_vjp = jax.vjp(y_at, t_star, *primals)
        t_bar, *y_at_bar = y_at_vjp(y_star_bar)
        # One pullback of the scalar φ gives ∂φ/∂t and ∂φ/∂(y_n, y_{n+1}, k, θ).
        value, condition_vjp = jax.vjp(condition, t_star, *primals, params)
        d_condition_dt, *d_condition = condition_vjp(jnp.ones_like(value))
        dt_star_bar = -(t_star_bar + t_bar) / d_condition_dt
        *condition_bar, params_bar_condition = jtu.tree_map(
            lambda d: (dt_star_bar * d).astype(d.dtype), d_condition
        )
        y_start_bar, lam, k_bar = (
            _add(_add(a, b), c)
            for a, b, c in zip(
                (y_start_bar, lam, k_bar), y_at_bar, condition_bar, strict=True
            )
        )
        return y_start_bar, lam, k_bar, _add(params_bar, params_bar_condition)

    def step_back(carry):
        n, ts_indices, lam, params_bar = carry
        prev = jnp.maximum(n - 1, 0)
        t_start = jnp.where(n == 0, t0, step_ts[prev])
        t_end = step_ends[n]  # step_ts[n] but at a jump (see `_RecordStepEnds`)
        y_start = jtu.tree_map(
            lambda a, buf: jnp.where(n == 0, a, buf[prev]), y0, step_ys
        )
        y_end = _index(step_ys, n)

        # Diffrax saves ts[j] in the first step with ts[j] <= t_end.
        def has_save(out, j):
            return (j >= 0) & ((out.ts[jnp.maximum(j, 0)] > t_start) | (n == 0))

        # A step that is interpolated (a save inside it, dense output, the event
        # time) needs every stage; otherwise y_{n+1} needs `solution_stages`, and
        # their pullback every k but the last.
        if dense_bar is not None:
            interpolated = True
        else:
            interpolated = [has_save(out, ts_indices[out.index]) for out in saves_ts]
            if event_root is not None:
                interpolated.append(n == num_steps - 1)
            interpolated = ft.reduce(jnp.logical_or, interpolated, False)
        if interpolated is True:
            num_pulled = num_computed = num_stages
        elif interpolated is False:
            num_pulled, num_computed = solution_stages, solution_stages - 1
        else:
            num_pulled = jnp.where(interpolated, num_stages, solution_stages)
            num_computed = jnp.where(interpolated, num_stages, solution_stages - 1)
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
        if dense_bar is not None:
            info_bar = _index(dense_bar, n)
            y_start_bar = _add_cotangent(y_start_bar, info_bar["y0"])
            lam = _add_cotangent(lam, info_bar["y1"])
            if "k" in info_bar:  # Euler's has none
                k_bar = _add_cotangent(k_bar, info_bar["k"])
        if event_root is not None:
            y_start_bar, lam, k_bar, params_bar = lax.cond(
                event_happened & (n == num_steps - 1),
                ft.partial(pull_event_time, t_start, t_end, y_start, y_end, ks),
                lambda *cotangents: cotangents,
                y_start_bar,
                lam,
                k_bar,
                params_bar,
            )
        ts_indices = list(ts_indices)
        for out in outputs:
            if out.steps:
                # Saved after this step's ts saves, if the step's number divides.
                g = out.cotangent(ts_indices[out.index] + 1, n)
                is_saved = True if out.steps == 1 else (n + 1) % out.steps == 0
                y_end_bar, params_bar = pull_value_if(
                    is_saved, out, step_ts[n], y_end, g, params_bar
                )
                lam = _add(lam, y_end_bar)
            if not out.num_ts:
                continue

            def pull_save(c, out=out):
                j, y_start_bar, lam, k_bar, params_bar = c
                (ya_bar, yb_bar, kk_bar), params_bar = pull_value(
                    out,
                    out.ts[j],
                    lambda ya, yb, k: interpolate(t_start, t_end, ya, yb, k, out.ts[j]),
                    (y_start, y_end, ks),
                    out.cotangent(j, n),
                    params_bar,
                )
                return (
                    j - 1,
                    _add(y_start_bar, ya_bar),
                    _add(lam, yb_bar),
                    _add(k_bar, kk_bar),
                    params_bar,
                )

            ts_indices[out.index], y_start_bar, lam, k_bar, params_bar = lax.while_loop(
                lambda c, out=out: has_save(out, c[0]),
                pull_save,
                (ts_indices[out.index], y_start_bar, lam, k_bar, params_bar),
            )
        b = jnp.asarray(tableau.b[:num_stages])
        k_bar = jtu.tree_map(
            lambda kb, lm: kb + outer_weights(b, lm),
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
        return n - 1, tuple(ts_indices), lam, params_bar

    # The saves at t1 that are not the last step's (where `steps` does not divide).
    has_steps = num_steps > 0
    last = jnp.maximum(num_steps - 1, 0)
    t_final = jnp.where(has_steps, step_ts[last], t0)
    y_final = jtu.tree_map(
        lambda a, buf: jnp.where(has_steps, buf[last], a), y0, step_ys
    )
    lam = jtu.tree_map(jnp.zeros_like, y0)
    params_bar = jtu.tree_map(jnp.zeros_like, params)
    if event_root is None:
        for out in outputs:
            if out.t1 and out.steps != 1:
                is_saved = True if not out.steps else num_steps % out.steps != 0
                g = out.cotangent(num_ts_saved[out.index], num_steps)
                y_bar, params_bar = pull_value_if(
                    is_saved, out, t_final, y_final, g, params_bar
                )
                lam = _add(lam, y_bar)
    else:
        # The t1 saves are made at the event time t* (or at the end, if no event
        # happened): y* = y(t*) interpolated in the last step.
        t_star, y_star, event_happened, event_mask = event_root
        t_star = jnp.where(has_steps, t_star, t0)
        y_star = jtu.tree_map(lambda a, b: jnp.where(has_steps, b, a), y0, y_star)
        t_star_bar = jnp.zeros_like(t_star)
        y_star_bar = jtu.tree_map(jnp.zeros_like, y0)
        for out, grad in zip(outputs, grad_saved, strict=True):
            if not out.t1:
                continue
            slot = out.slot(num_ts_saved[out.index], num_steps)
            g = _index(out.grad_ys, slot)
            (t_bar, y_bar), params_bar = pull_value(
                out, t_star, _identity, (t_star, y_star), g, params_bar, of_t=True
            )
            if grad.ts is not None:  # the event time itself, as `sol.ts`
                t_bar = t_bar + grad.ts[slot]
            t_star_bar = t_star_bar + t_bar
            y_star_bar = _add(y_star_bar, y_bar)
        # Without an event, y* is the last step's end.
        lam = jtu.tree_map(lambda b: jnp.where(event_happened, 0, b), y_star_bar)

    carry = (num_steps - 1, tuple(n - 1 for n in num_ts_saved), lam, params_bar)
    _, _, y0_bar, params_bar = lax.while_loop(lambda c: c[0] >= 0, step_back, carry)

    for out in outputs:
        # The t0 save, and with t0 == t1 the ts saves, all of fn(t0, y0, args).
        g = jtu.tree_map(jnp.zeros_like, out.struct)
        if out.t0:
            g = _index(out.grad_ys, 0)
        if out.num_ts:
            g = _add(g, out.ts_cotangent_if(t0 == t1))
        if out.t0 or out.num_ts:
            y_bar, params_bar = pull_value_if(True, out, t0, y0, g, params_bar)
            y0_bar = _add(y0_bar, y_bar)
    return jtu.tree_map(_first_order_only, (y0_bar, *params_bar))


def _identity(y):
    return y


class _Output:
    """One `SubSaveAt` of the solve and the cotangent of what it saved.

    Diffrax writes its saves in order: fn(t0) if `t0`; then, step by step, the `ts`
    inside the step followed by the step's end if `steps` divides the step's number;
    then fn(t1) if `t1` and not already saved as a step.
    """

    def __init__(self, index, sub, fn, grad_ys, t0, y0, args, max_steps):
        self.index = index
        self.saves_y = fn is private.save_y
        self.t0 = int(sub.t0)
        self.t1 = sub.t1
        self.ts = sub.ts
        self.num_ts = 0 if sub.ts is None else len(sub.ts)
        self.steps = int(sub.steps)
        self.struct = eqx.filter_eval_shape(fn, t0, y0, args)
        size = self.t0 + self.num_ts
        if self.steps:
            size += max_steps // self.steps
        if self.t1 and (not self.steps or max_steps % self.steps):
            size += 1
        self.grad_ys = _materialise(grad_ys, self.struct, size)

    def slot(self, num_ts_before, num_steps_before):
        """Where the save made after `num_ts_before` of the `ts` and
        `num_steps_before` steps is written."""
        step_saves = num_steps_before // self.steps if self.steps else 0
        return self.t0 + num_ts_before + step_saves

    def cotangent(self, num_ts_before, num_steps_before):
        """The cotangent of the save made after `num_ts_before` of the `ts` and
        `num_steps_before` steps."""
        return _index(self.grad_ys, self.slot(num_ts_before, num_steps_before))

    def ts_cotangent_if(self, pred):
        """The summed cotangents of all the `ts` saves if `pred`, else zeros."""
        return jtu.tree_map(
            lambda gys: jnp.where(
                pred, jnp.sum(gys[self.t0 : self.t0 + self.num_ts], axis=0), 0
            ),
            self.grad_ys,
        )


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


def _materialise(grad_ys, struct, size):
    """Zeros where JAX passed a symbolic-zero (`None`) cotangent."""
    zeros = lambda s: jnp.zeros((size, *s.shape), s.dtype)
    if grad_ys is None:
        return jtu.tree_map(zeros, struct)
    return jtu.tree_map(
        lambda g, s: zeros(s) if g is None else g,
        grad_ys,
        struct,
        is_leaf=lambda x: x is None,
    )
