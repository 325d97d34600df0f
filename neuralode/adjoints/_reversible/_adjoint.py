"""`ReversibleAdjoint`: the forward solve keeps only each accepted step's interval; the
backward pass undoes the steps last to first and pulls each back stage by stage."""

import functools as ft

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from .. import _diffrax_private as private
from .._constant_inputs import constant_times, first_order_only, forward_only
from .._input_checks import checked_inputs
from .._symplectic._adjoint import closure_converted, loop_arguments
from .._symplectic._outputs import Outputs, per_sub
from .._symplectic._record import StepRecord, solve
from .._symplectic._tableau import outer_weights, pullback_stages
from ._solver import DEFAULT_COUPLING, Reversible, check_coupling, y_before, z_before


class ReversibleAdjoint(diffrax.AbstractAdjoint):
    """Exact gradients of a `neuralode.Reversible` solve in memory that does not grow
    with the number of steps: the backward pass undoes each step in closed form
    instead of storing the trajectory.

    Use it as `diffrax.diffeqsolve(..., solver=neuralode.Reversible(diffrax.Tsit5()),
    adjoint=neuralode.ReversibleAdjoint())`. It returns the same solution and, to
    rounding, the same gradients as `diffrax.RecursiveCheckpointAdjoint()` on the same
    `Reversible` solver, with respect to `y0`, `args` and the parameters inside
    `terms` (arrays the vector field closes over included), for every explicit
    Runge--Kutta solver `Reversible` wraps (a `diffrax.AbstractERK` with your own
    `ButcherTableau` too), with constant or adaptive steps, `SaveAt` of `t0`, `t1`,
    `ts` (between steps, through the interpolation) and `steps` (also through
    `fn=...`), either time direction, `jit` and `vmap`.

    Its gradient is that of the reversible discretisation, not of the wrapped
    solver's: `Reversible(solver)` solves the ODE differently from `solver` (to the
    same order). It is exact up to the rounding errors of undoing the steps, which
    grow with the number of steps n as λ^{−n} (see `neuralode.Reversible`'s
    `coupling`).

    Memory: the states y and z and their cotangents, the stages of one step of the
    wrapped solver and their cotangents, one evaluation of f's activations
    (O(|y| + s·|y| + m·d)), and the interval of each accepted step (2·`max_steps`
    scalars). Compute: the forward solve evaluates f 2·s times per step; the backward
    pass evaluates it 2·s times to undo each accepted step and runs 2·s VJPs of it.

    **Arguments:**

    - `coupling`: the λ with which `wrap` wraps a solver (default: `Reversible`'s,
        0.999). When given, a solve whose `Reversible` solver has another λ is
        refused, as a mismatch of the two settings.

    !!! warning

        It differentiates solves of `neuralode.Reversible` only: any other solver is
        solved as by Diffrax's default adjoint, and differentiating that solve raises
        an error that says how to wrap the solver. So are events,
        `SaveAt(dense=True)`, `SaveAt(solver_state=True)`,
        `SaveAt(controller_state=True)`, a passed `solver_state` and
        `max_steps=None`. Reverse mode and first derivatives only, like
        `neuralode.SymplecticAdjoint`; gradients with respect to `t0`, `t1`, `dt0`,
        the save times, `step_ts` or `jump_ts` raise an error naming
        `diffrax.RecursiveCheckpointAdjoint()`.

    ??? cite "References"

        ```bibtex
        @article{mccallum2024efficient,
            title = {Efficient, Accurate and Stable Gradients for Neural ODEs},
            author = {McCallum, Sam and Foster, James},
            journal = {arXiv preprint arXiv:2410.11648},
            year = {2024},
        }
        ```
    """

    coupling: float | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        if self.coupling is not None:
            check_coupling("ReversibleAdjoint", self.coupling)

    def wrap(self, solver: diffrax.AbstractSolver) -> Reversible:
        """`solver` made reversible, as this adjoint differentiates it:
        `neuralode.Reversible(solver, coupling=self.coupling)`."""
        if isinstance(solver, Reversible):
            return solver
        coupling = DEFAULT_COUPLING if self.coupling is None else self.coupling
        return Reversible(solver, coupling=coupling)

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
        init_state = checked_inputs(init_state, terms, args, t0, throw)
        t0, t1, dt0, saveat, kwargs["stepsize_controller"] = constant_times(
            "ReversibleAdjoint", t0, t1, dt0, saveat, kwargs["stepsize_controller"]
        )
        self._check_coupling_matches(solver)
        unsupported = _unsupported(
            terms,
            solver,
            event,
            saveat,
            max_steps,
            passed_solver_state,
            kwargs["stepsize_controller"],
        )
        solve_kwargs = dict(solver=solver, saveat=saveat, t0=t0, t1=t1, dt0=dt0)
        solve_kwargs.update(max_steps=max_steps, **kwargs)
        if unsupported is not None:
            return forward_only(
                unsupported,
                args=args,
                terms=terms,
                event=event,
                init_state=init_state,
                **solve_kwargs,
            )
        y0 = init_state.y
        _, terms, fns, solve_kwargs["saveat"] = closure_converted(
            None, terms, saveat, init_state, args
        )
        init_state = private.nondiff_solver_controller_state(
            self, init_state, False, passed_controller_state
        )
        # y_0 and z_0 (= y_0) enter as the custom VJP's input y0, not as its state.
        init_state = eqx.tree_at(
            lambda s: (s.y, s.solver_state), init_state, (object(), object())
        )
        final_state, aux_stats = _reversible_loop(
            (y0, args, terms, fns, None), init_state=init_state, **solve_kwargs
        )
        return private.only_transpose_ys(final_state), aux_stats

    def _check_coupling_matches(self, solver) -> None:
        if (
            self.coupling is not None
            and isinstance(solver, Reversible)
            and solver.coupling != self.coupling
        ):
            raise ValueError(
                f"ReversibleAdjoint(coupling={self.coupling}) was given a solver "
                f"with coupling {solver.coupling}; set λ in one place: "
                "`ReversibleAdjoint().wrap(solver)` or "
                "`neuralode.Reversible(solver, coupling=...)` with "
                "`ReversibleAdjoint()`."
            )


def _unsupported(
    terms, solver, event, saveat, max_steps, passed_solver_state, controller
):
    """Why this adjoint cannot differentiate the solve, with an alternative, or
    `None`. (A solve that is not differentiated runs whatever the answer.)"""
    rca = "`adjoint=diffrax.RecursiveCheckpointAdjoint()`"
    if not isinstance(solver, Reversible):
        name = type(solver).__name__
        made = (
            f"diffrax.{name}()"
            if type(solver).__module__.startswith("diffrax")
            else f"{name}()"
        )
        return (
            f"ReversibleAdjoint differentiates solves of `neuralode.Reversible` only, "
            f"got the solver {name}. Wrap it: "
            f"`solver=neuralode.Reversible({made})` (or "
            "`neuralode.ReversibleAdjoint().wrap(solver)`), the algebraically "
            f"reversible scheme built on {name}, whose solution differs from "
            f"{name}'s; or keep {name} with another adjoint, such as "
            "`neuralode.SymplecticAdjoint()`. (Solving without differentiating "
            "works as with any adjoint.)"
        )
    if max_steps is None:
        return (
            "ReversibleAdjoint needs `diffeqsolve(..., max_steps=<int>)` to be "
            "differentiated: it records the interval of each accepted step."
        )
    if event is not None:
        return _refusal("an event", rca)
    if saveat.dense:
        return _refusal("`SaveAt(dense=True)`", f"`SaveAt(ts=...)` or {rca}")
    if saveat.solver_state or saveat.controller_state:
        return _refusal(
            "`SaveAt(solver_state=True)` or `SaveAt(controller_state=True)`", rca
        )
    if private.is_unsafe_sde(terms):
        return _refusal("`UnsafeBrownianPath`", "`diffrax.VirtualBrownianTree`")
    if passed_solver_state:
        return _refusal("a passed `solver_state` (z_0 = y_0 is its start)", rca)
    if _has_jump_ts(controller):
        return _refusal(
            "`jump_ts` (the pair restarts there, z_n = y_n, which cannot be undone)",
            f"`step_ts` or {rca}",
        )
    return None


def _has_jump_ts(controller) -> bool:
    if not isinstance(controller, diffrax.ClipStepSizeController):
        return False
    return controller.jump_ts is not None or _has_jump_ts(controller.controller)


def _refusal(what: str, instead: str) -> str:
    return (
        f"ReversibleAdjoint cannot differentiate a solve with {what}. Use {instead} "
        "instead. (Solving without differentiating works as with any adjoint.)"
    )


def _loop_kwargs(inputs, **kwargs) -> dict:
    """The arguments of Diffrax's solve loop, with y_0 and z_0 = y_0 from `inputs`."""
    loop_kwargs = loop_arguments(inputs, **kwargs)
    init_state = eqx.tree_at(
        lambda s: s.solver_state, loop_kwargs["init_state"], inputs[0]
    )
    return dict(loop_kwargs, init_state=init_state)


_LAX_WHILE_LOOP = ft.partial(eqxi.while_loop, kind="lax")


@eqx.filter_custom_vjp
def _reversible_loop(inputs, **kwargs):
    return private.loop(
        inner_while_loop=_LAX_WHILE_LOOP,
        outer_while_loop=_LAX_WHILE_LOOP,
        **_loop_kwargs(inputs, **kwargs),
    )


@_reversible_loop.def_fwd
def _reversible_loop_fwd(perturbed, inputs, *, max_steps, **kwargs):
    del perturbed
    final_state, aux_stats, record = solve(
        num_slots=None,
        max_steps=max_steps,
        loop_kwargs=_loop_kwargs(inputs, **kwargs),
        keep_states=False,
    )
    num_ts_saved = tuple(
        save_state.saveat_ts_index
        for save_state in per_sub(kwargs["saveat"], final_state.save_state)
    )
    ends = (final_state.tprev, final_state.y, final_state.solver_state)
    residuals = (record, final_state.num_accepted_steps, num_ts_saved, ends)
    return (final_state, aux_stats), residuals


@_reversible_loop.def_bwd
def _reversible_loop_bwd(
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
    record, num_steps, num_ts_saved, (t_final, y_final, z_final) = residuals
    y0, args, terms, fns, event = inputs
    params, static = eqx.partition((args, terms, fns, event), eqx.is_inexact_array)
    outputs = Outputs(
        saveat=saveat,
        fns=fns,
        grad_save_state=grad_final_state__aux_stats[0].save_state,
        dense_bar=None,
        num_ts_saved=num_ts_saved,
        event_root=None,
        solver=solver,
        params=params,
        static=static,
        t0=t0,
        t1=t1,
        y0=y0,
        args=args,
        max_steps=max_steps,
        dense_info=solver.dense_info,
    )
    pull = _StepPullback(solver, outputs, params, static)
    params_bar = jtu.tree_map(jnp.zeros_like, params)
    y_bar, params_bar = outputs.at_end(num_steps, t_final, y_final, params_bar)
    z_bar = jtu.tree_map(jnp.zeros_like, z_final)
    carry = (outputs.initial_ts_indices(), y_final, z_final, y_bar, z_bar, params_bar)
    carry = _reverse(pull, record, num_steps, carry)
    *_, y_bar, z_bar, params_bar = carry
    y0_bar = jtu.tree_map(jnp.add, y_bar, z_bar)  # z_0 = y_0
    y0_bar, params_bar = outputs.at_start(y0_bar, params_bar)
    return first_order_only("ReversibleAdjoint", (y0_bar, *params_bar))


def _reverse(pull, record: StepRecord, num_steps, carry):
    """Pull back steps `num_steps - 1, ..., 0`, their intervals read from `record`."""

    def body(state):
        n, carry = state
        return n - 1, pull(n, record.t_start[n], record.t_end[n], carry, num_steps)

    _, carry = lax.while_loop(lambda s: s[0] >= 0, body, (num_steps - 1, carry))
    return carry


class _StepPullback:
    """One step undone and pulled back, with the cotangents of its outputs."""

    def __init__(self, solver: Reversible, outputs: Outputs, params, static):
        self.tableau = solver.base_tableau
        self.coupling = solver.coupling
        self.outputs = outputs
        self.params, self.static = params, static
        self.solution_stages = self.tableau.stages_for_solution()
        # Interpolating a step needs every stage of its forward step from z_n.
        if outputs.interpolates:
            self.num_stages = self.tableau.num_stages
        else:
            self.num_stages = self.solution_stages

    def vf_prod(self, t, y, t_start, t_end, params=None):
        params = self.params if params is None else params
        _args, _terms, _, _ = eqx.combine(params, self.static)
        return _terms.vf_prod(t, y, _args, _terms.contr(t_start, t_end))

    def vf_prod_vjp(self, t_start, t_end):
        """`(t, y, cotangent) -> (y_bar, params_bar)`: one VJP of the field-control
        product of a step from `t_start` to `t_end`."""

        def vjp(t, y, cotangent):
            _, pull = jax.vjp(
                lambda y_, p_: self.vf_prod(t, y_, t_start, t_end, p_), y, self.params
            )
            return pull(cotangent)

        return vjp

    def __call__(self, n, t_start, t_end, carry, num_steps):
        """`carry` = (ts_indices, y_{n+1}, z_{n+1}, ȳ_{n+1}, z̄_{n+1}, params_bar)
        becomes the same at step n's start."""
        ts_indices, y1, z1, y1_bar, z1_bar, params_bar = carry
        tab, ns, sol = self.tableau, self.num_stages, self.solution_stages
        b = jnp.asarray(tab.b)
        # z_{n+1} = z_n − Ψ_{−h}(t_{n+1}, y_{n+1}): undone, and its cotangent sent to
        # y_{n+1} at once, before the other step's stages are computed.
        z0, ks_back = z_before(tab, self.vf_prod, t_start, t_end, y1, z1)
        k_bar = jtu.tree_map(lambda zb: outer_weights(-b[:sol], zb), z1_bar)
        y1_bar_z, params_bar = pullback_stages(
            tab,
            sol,
            self.vf_prod_vjp(t_end, t_start),
            t_end,
            t_start,
            y1,
            ks_back,
            k_bar,
            params_bar,
        )
        # y_{n+1} = λ y_n + (1 − λ) z_n + Ψ_h(t_n, z_n)
        num_forward = self._forward_stages(n, t_start, ts_indices, num_steps)
        y0, ks = y_before(
            tab,
            self.coupling,
            self.vf_prod,
            t_start,
            t_end,
            y1,
            z0,
            num_stages=ns,
            num_computed=num_forward,
        )
        zeros = lambda tree: jtu.tree_map(jnp.zeros_like, tree)
        cotangents = (ts_indices, zeros(y0), y1_bar, (zeros(z0), zeros(ks)), params_bar)
        ts_indices, y0_bar, y1_bar, (z0_bar, k_bar), params_bar = self.outputs.in_step(
            n, (t_start, t_end, y0, y1), (z0, ks), cotangents, num_steps
        )
        a = jtu.tree_map(jnp.add, y1_bar, y1_bar_z)  # all of ∂L/∂y_{n+1}
        k_bar = jtu.tree_map(lambda kb, a_: kb + outer_weights(b[:ns], a_), k_bar, a)
        z0_bar_y, params_bar = pullback_stages(
            tab,
            ns,
            self.vf_prod_vjp(t_start, t_end),
            t_start,
            t_end,
            z0,
            ks,
            k_bar,
            params_bar,
            num_pulled=num_forward,
        )
        lam = self.coupling
        y0_bar = jtu.tree_map(lambda yb, a_: yb + lam * a_, y0_bar, a)
        z0_bar = jtu.tree_map(
            lambda zb, z1b, a_, zy: zb + z1b + (1 - lam) * a_ + zy,
            z0_bar,
            z1_bar,
            a,
            z0_bar_y,
        )
        return ts_indices, y0, z0, y0_bar, z0_bar, params_bar

    def _forward_stages(self, n, t_start, ts_indices, num_steps):
        """How many stages of the forward step from z_n to compute: those its end
        needs, or all of them where the step is interpolated."""
        if self.num_stages == self.solution_stages:
            return self.solution_stages
        interpolated = self.outputs.interpolated(n, t_start, ts_indices, num_steps)
        return jnp.where(interpolated, self.num_stages, self.solution_stages)
