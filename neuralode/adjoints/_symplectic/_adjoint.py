"""The symplectic adjoint: the exact gradient of an explicit Runge--Kutta solve, in
memory that follows the steps taken.

The gradient of the *discretised* solve is the symplectic partitioned Runge--Kutta
method paired with the forward solver (Sanz-Serna 2016; Matsubara, Miyatake & Yaguchi
2021). Here it is computed as reverse mode of each explicit RK step, stage by stage
(`_tableau.py`), so that only one evaluation of f has live activations (m·d memory),
with the cotangents of the solve's outputs added where they arise (`_outputs.py`).
What the forward pass keeps, and so how the backward pass finds each step's start, is
the schedule (`_record.py`, `_schedule.py`, `_backward.py`):

- every step: the start y_n of every accepted step is recorded (n·|y| memory, for
  `max_steps` steps), and each step is recomputed once, from its start;
- c checkpoints: the loop's state at the start of c accepted steps, chosen online;
  the steps between are recomputed from them by treeverse (binomial checkpointing,
  as Diffrax's `RecursiveCheckpointAdjoint` does), c·|y| memory whatever `max_steps`.

The accepted step sizes are constants of the discretisation (Diffrax's adaptive
controllers stop gradients through their error estimates), so the result equals
`diffrax.RecursiveCheckpointAdjoint` on the same call, to rounding.
"""

import functools as ft
from typing import Literal

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from .. import _diffrax_private as private
from .._closure import closure_convert_event, closure_convert_fn, closure_convert_terms
from .._constant_inputs import constant_times, first_order_only, forward_only
from .._input_checks import checked_inputs
from ._backward import StepPullback, checkpointed_reverse, every_step_reverse
from ._outputs import EventRoot, Outputs, index, is_subsaveat, per_sub, subs_of
from ._record import make_stepper, solve
from ._schedule import default_checkpoints
from ._tableau import explicit_tableau


class SymplecticAdjoint(diffrax.AbstractAdjoint):
    """Exact gradients of an explicit Runge--Kutta solve, in memory you choose: one
    state per step, or a fixed number of checkpoints.

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

    **Arguments:**

    - `checkpoints`: what the forward pass keeps for the backward pass.
        - `None` (the default): as many checkpoints as Diffrax's
            `RecursiveCheckpointAdjoint()` keeps, the fewest c with
            `max_steps < (c + 1)(c + 2) / 2` (90 for Diffrax's default
            `max_steps=4096`). Then no step of any solve within `max_steps` is
            recomputed more than twice, memory grows as √max_steps, and the time
            follows the steps taken.
        - an int c: at most c checkpoints of the loop's state (each about two states:
            y and the solver's first-same-as-last stage), whatever `max_steps`; the
            steps between them are recomputed (treeverse). Fewer checkpoints trade
            compute for memory: n steps take about n·log(n)/log(c) recomputed steps
            once n exceeds (c + 1)(c + 2)/2. `max_steps=None` is then allowed.
        - `"all"` (or any c >= `max_steps`): the start of every step is stored, one
            state per step for `max_steps` steps, and no step is recomputed more
            than once. Keep `max_steps` near the number of
            steps needed.

    - `step_activations`: pull each recomputed step back with one VJP of the whole
        step, holding its s evaluations' activations (s·m·d) meanwhile, instead of
        one VJP per stage that evaluates f once more (the default, m·d). It saves
        one evaluation of f per stage of every step (about a fifth of the gradient's
        work with every step kept), for the memory of s evaluations' activations.

    The backward pass holds one step's stages and one evaluation of f's activations.
    Dense output is itself s + 2 states per step (Diffrax stores each step's y_n,
    y_{n+1} and stages), and so is its cotangent: with `SaveAt(dense=True)` that, not
    the adjoint, dominates memory. Compute: each step's stages are evaluated at least
    three times (forward, recompute, and inside their VJP).

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

    checkpoints: int | Literal["all"] | None = eqx.field(default=None, static=True)
    step_activations: bool = eqx.field(default=False, static=True)

    def __check_init__(self):
        c = self.checkpoints
        if not isinstance(self.step_activations, bool):
            raise ValueError(
                "SymplecticAdjoint: `step_activations` must be True or False, got "
                f"{self.step_activations!r}."
            )
        if c is None or (isinstance(c, str) and c == "all"):
            return
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(
                "SymplecticAdjoint: `checkpoints` must be a positive int, 'all' or "
                f"None, got {c!r}."
            )

    def _num_slots(self, max_steps: int | None) -> int | None:
        """How many checkpoints to keep, or `None` for every step."""
        if self.checkpoints == "all":
            return None
        if self.checkpoints is None:
            if max_steps is None:
                return None  # refused: `_unsupported`
            num_slots = default_checkpoints(max_steps)
        else:
            num_slots = self.checkpoints
        if max_steps is not None and num_slots >= max_steps:
            return None
        return num_slots

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
            "SymplecticAdjoint", t0, t1, dt0, saveat, kwargs["stepsize_controller"]
        )
        num_slots = self._num_slots(max_steps)
        unsupported = _unsupported(
            terms, solver, event, saveat, max_steps, num_slots, passed_solver_state
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
        event, terms, fns, saveat = closure_converted(
            event,
            terms,
            saveat,
            init_state,
            args,
            solver=solver,
            t0=t0,
            t1=t1,
            dt0=dt0,
            stepsize_controller=kwargs["stepsize_controller"],
            max_steps=max_steps,
        )
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
            num_slots=num_slots,
            step_activations=self.step_activations,
            **kwargs,
        )
        return _transposed(final_state, saveat, event), aux_stats


def closure_converted(event, terms, saveat, init_state, args, **solve_kwargs):
    """`event`, `terms`, the `SaveAt(fn=...)`s and `saveat` with plain `fn`s, with
    every array they close over made a leaf: the custom VJP differentiates only its
    inputs."""
    t, y0 = init_state.tprev, init_state.y
    # An event's `cond_fn` may close over parameters too (e.g. a threshold), which
    # the event time found by a root finder depends on. It gets Diffrax's keyword
    # arguments.
    event = closure_convert_event(
        event, t, y0, args, terms=terms, saveat=saveat, **solve_kwargs
    )
    terms = closure_convert_terms(terms, t, y0, args)
    # Each `SaveAt(fn=...)` is differentiated too (it may hold or close over
    # parameters), so it travels with the differentiable inputs.
    fns = tuple(closure_convert_fn(sub.fn, t, y0, args) for sub in subs_of(saveat))
    saveat = _with_fns(saveat, (private.save_y,) * len(fns))
    return event, terms, fns, saveat


def _transposed(final_state, saveat, event):
    """The parts of the final state that carry cotangents: the saves, the event time
    (saved as the last `ts` entry) and dense output (each step's (y0, y1, k) is a
    function of the step's start and stages)."""
    transposed = private.only_transpose_ys(final_state)
    if _finds_root(event):
        save_ts = lambda s: [x.ts for x in per_sub(saveat, s.save_state)]
        transposed = eqx.tree_at(save_ts, transposed, save_ts(final_state))
    if saveat.dense:
        transposed = eqx.tree_at(
            lambda s: s.dense_infos, transposed, final_state.dense_infos
        )
    return transposed


def _unsupported(
    terms, solver, event, saveat, max_steps, num_slots, passed_solver_state
):
    """Why this adjoint cannot differentiate the solve exactly, with an alternative,
    or `None`. (A solve that is not differentiated runs whatever the answer.)"""
    rca = "`adjoint=diffrax.RecursiveCheckpointAdjoint()`"
    if _finds_root(event) and (
        saveat.dense or any(sub.steps for sub in subs_of(saveat))
    ):
        # Diffrax then rewrites the last step's saves after the root find.
        return _refusal(
            "an event with a root finder together with `SaveAt(steps=...)` or "
            "`SaveAt(dense=True)`",
            f"`SaveAt(t0=..., t1=..., ts=...)`, `root_finder=None` or {rca}",
        )
    if max_steps is None and num_slots is None:
        return (
            "SymplecticAdjoint needs `diffeqsolve(..., max_steps=<int>)` to be "
            "differentiated, or a number of checkpoints: "
            "`SymplecticAdjoint(checkpoints=<int>)`."
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


def _with_fns(saveat: diffrax.SaveAt, fns) -> diffrax.SaveAt:
    """`saveat` with the `fn` of each of its `SubSaveAt`s replaced, in order."""
    if saveat.subs is None:
        return saveat
    subs = [
        eqx.tree_at(lambda sub: sub.fn, sub, fn)
        for sub, fn in zip(subs_of(saveat), fns, strict=True)
    ]
    treedef = jtu.tree_structure(saveat.subs, is_leaf=is_subsaveat)
    return eqx.tree_at(lambda s: s.subs, saveat, jtu.tree_unflatten(treedef, subs))


def _is_none(x) -> bool:
    return x is None


def loop_arguments(inputs, *, init_state, saveat, **kwargs) -> dict:
    """The arguments of Diffrax's solve loop, the differentiable ones from `inputs`."""
    y0, args, terms, fns, event = inputs
    init_state = eqx.tree_at(lambda s: s.y, init_state, y0)
    saveat = _with_fns(saveat, fns)
    return dict(
        args=args,
        terms=terms,
        event=event,
        init_state=init_state,
        saveat=saveat,
        **kwargs,
    )


@eqx.filter_custom_vjp
def _symplectic_loop(inputs, *, num_slots, step_activations, **kwargs):
    del num_slots, step_activations
    return private.loop(
        inner_while_loop=_LAX_WHILE_LOOP,
        outer_while_loop=_LAX_WHILE_LOOP,
        **loop_arguments(inputs, **kwargs),
    )


_LAX_WHILE_LOOP = ft.partial(eqxi.while_loop, kind="lax")


@_symplectic_loop.def_fwd
def _symplectic_loop_fwd(
    perturbed, inputs, *, num_slots, step_activations, max_steps, **kwargs
):
    del perturbed, step_activations
    loop_kwargs = loop_arguments(inputs, **kwargs)
    finds_root = _finds_root(inputs[4])
    if finds_root:
        loop_kwargs = _with_t1_save(loop_kwargs, inputs[0])
    final_state, aux_stats, record = solve(
        num_slots=num_slots, max_steps=max_steps, loop_kwargs=loop_kwargs
    )
    event_root = None
    if finds_root:
        final_state, event_root = _without_t1_save(final_state, inputs[0], kwargs)
    # How many of each output's `ts` were saved: all, unless the solve stopped early
    # (`throw=False`, an event).
    num_ts_saved = tuple(
        save_state.saveat_ts_index
        for save_state in per_sub(kwargs["saveat"], final_state.save_state)
    )
    ends = (final_state.tprev, final_state.y)  # of the last step (or t0, y0)
    residuals = (record, final_state.num_accepted_steps, num_ts_saved, event_root, ends)
    return (final_state, aux_stats), residuals


def _with_t1_save(loop_kwargs: dict, y0) -> dict:
    """One more output, (t, y) at the end: at the event time t* that a root finder
    finds, y* = y(t*). (`SaveAt(dense=True)` alone has no other output: its `subs`
    are `None`.)"""
    saveat = eqx.tree_at(
        lambda s: s.subs,
        loop_kwargs["saveat"],
        (loop_kwargs["saveat"].subs, diffrax.SubSaveAt(t1=True)),
        is_leaf=_is_none,
    )
    init_state = loop_kwargs["init_state"]
    save_t1 = private.SaveState(
        saveat_ts_index=0,
        ts=jnp.full(1, jnp.inf, dtype=jnp.result_type(init_state.tprev)),
        ys=jtu.tree_map(lambda y: jnp.full((1, *y.shape), jnp.inf, y.dtype), y0),
        save_index=0,
    )
    init_state = eqx.tree_at(
        lambda s: s.save_state,
        init_state,
        (init_state.save_state, save_t1),
        is_leaf=_is_none,
    )
    return dict(loop_kwargs, saveat=saveat, init_state=init_state)


def _without_t1_save(final_state, y0, kwargs):
    """`final_state` without the output `_with_t1_save` added, and the `EventRoot`."""
    save_state, save_t1 = final_state.save_state
    final_state = eqx.tree_at(
        lambda s: s.save_state, final_state, save_state, is_leaf=_is_none
    )
    has_steps = final_state.num_accepted_steps > 0
    y_star = jtu.tree_map(
        lambda a, b: jnp.where(has_steps, b, a), y0, index(save_t1.ys, 0)
    )
    root = EventRoot(
        t=jnp.where(has_steps, save_t1.ts[0], kwargs["t0"]),
        y=y_star,
        happened=ft.reduce(jnp.logical_or, jtu.tree_leaves(final_state.event_mask)),
        mask=final_state.event_mask,
    )
    return final_state, root


@_symplectic_loop.def_bwd
def _symplectic_loop_bwd(
    residuals,
    grad_final_state__aux_stats,
    perturbed,
    inputs,
    *,
    num_slots,
    step_activations,
    solver,
    saveat,
    t0,
    t1,
    max_steps,
    stepsize_controller,
    **kwargs,
):
    del perturbed, kwargs
    record, num_steps, num_ts_saved, event_root, (t_final, y_final) = residuals
    y0, args, terms, fns, event = inputs
    # Everything differentiable: args, the terms' parameters, those of each `fn` and
    # those of the event's condition.
    params, static = eqx.partition((args, terms, fns, event), eqx.is_inexact_array)
    grad_state = grad_final_state__aux_stats[0]
    # The cotangent of each step's dense output dict(y0, y1, k), if the loss used it.
    dense_bar = grad_state.dense_infos if saveat.dense else None
    if not jtu.tree_leaves(dense_bar):
        dense_bar = None
    outputs = Outputs(
        saveat=saveat,
        fns=fns,
        grad_save_state=grad_state.save_state,
        dense_bar=dense_bar,
        num_ts_saved=num_ts_saved,
        event_root=event_root,
        solver=solver,
        params=params,
        static=static,
        t0=t0,
        t1=t1,
        y0=y0,
        args=args,
        max_steps=max_steps,
    )
    tableau = explicit_tableau(solver)
    assert tableau is not None  # others are solved by `forward_only`
    pull = StepPullback(tableau, outputs, params, static, step_activations)
    params_bar = jtu.tree_map(jnp.zeros_like, params)
    lam, params_bar = outputs.at_end(num_steps, t_final, y_final, params_bar)
    carry = (outputs.initial_ts_indices(), lam, params_bar)
    if num_slots is None:
        carry = every_step_reverse(pull, record, y_final, num_steps, carry)
    else:
        stepper = make_stepper(terms, solver, stepsize_controller, args, t1)
        carry = checkpointed_reverse(pull, stepper, record, num_steps, carry)
    _, y0_bar, params_bar = carry
    y0_bar, params_bar = outputs.at_start(y0_bar, params_bar)
    return first_order_only("SymplecticAdjoint", (y0_bar, *params_bar))
