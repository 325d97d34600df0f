"""The forward pass: Diffrax's own solve loop, keeping what the backward pass reads.

Two records, one per schedule:

- `StepRecord`, every accepted step: its start y_n and its interval [t_n, t_{n+1}]
  (n·|y| memory, no activations of f), or its interval alone (for a scheme that
  recomputes y_n from y_{n+1}, as the reversible one does);
- `Checkpoints`, `c` of them: the loop's state at the start of a few accepted steps,
  chosen online (`_schedule.py`), from which `Stepper` recomputes the others exactly as
  the loop took them, rejected attempts included (c·|y| memory, and nothing that grows
  with `max_steps`).

Both are written by the solve loop itself, at the start of each attempted step, so the
last write for a step is the attempt that was accepted.
"""

import functools as ft
from typing import Any, NamedTuple

import equinox as eqx
import equinox.internal as eqxi
import jax.numpy as jnp
import jax.tree_util as jtu

from .. import _diffrax_private as private
from ._schedule import NEVER, STEP_DTYPE, OnlineState, online_init, online_slot


class Stepping(NamedTuple):
    """What the solve loop takes its next step from."""

    tprev: Any
    tnext: Any
    y: Any
    solver_state: Any
    controller_state: Any
    made_jump: Any


def stepping_of(state) -> Stepping:
    return Stepping(
        state.tprev,
        state.tnext,
        state.y,
        state.solver_state,
        state.controller_state,
        jnp.asarray(state.made_jump),
    )


class StepRecord(NamedTuple):
    """The start y_n (or `None`, not kept) and the interval [t_n, t_{n+1}] of every
    accepted step."""

    t_start: Any
    t_end: Any
    y_start: Any


class Checkpoints(NamedTuple):
    """Loop states at the start of some accepted steps (`steps`; `NEVER`: unused)."""

    steps: Any
    states: Stepping
    online: OnlineState
    next_step: Any  # the accepted step whose start the schedule sees next


class _EveryStep:
    def __init__(self, max_steps: int, keep_states: bool):
        self.max_steps = max_steps
        self.keep_states = keep_states

    def init(self, state) -> StepRecord:
        times = jnp.full(self.max_steps, jnp.inf, jnp.result_type(state.tprev))
        ys = None
        if self.keep_states:
            ys = jtu.tree_map(
                lambda y: jnp.zeros((self.max_steps, *y.shape), y.dtype), state.y
            )
        return StepRecord(times, times, ys)

    def buffers(self, record: StepRecord):
        return record

    def update(self, record: StepRecord, state) -> StepRecord:
        n = state.num_accepted_steps
        y_start = None
        if self.keep_states:
            # (The plain tree first: inside the loop the buffers are wrapped.)
            y_start = jtu.tree_map(
                lambda y, buf: buf.at[n].set(y), state.y, record.y_start
            )
        return StepRecord(
            record.t_start.at[n].set(state.tprev),
            record.t_end.at[n].set(state.tnext),
            y_start,
        )


class _Online:
    def __init__(self, num_slots: int, max_steps: int | None):
        self.num_slots = num_slots
        self.max_steps = max_steps

    def init(self, state) -> Checkpoints:
        stepping = stepping_of(state)
        return Checkpoints(
            steps=jnp.full(self.num_slots, NEVER, STEP_DTYPE),
            states=jtu.tree_map(
                lambda x: jnp.zeros(
                    (self.num_slots, *jnp.shape(x)), jnp.result_type(x)
                ),
                stepping,
            ),
            online=online_init(self.num_slots),
            next_step=jnp.zeros((), STEP_DTYPE),
        )

    def buffers(self, record: Checkpoints):
        return record.states

    def update(self, record: Checkpoints, state) -> Checkpoints:
        step = jnp.asarray(state.num_accepted_steps, STEP_DTYPE)
        first_attempt = step == record.next_step
        keep, slot, online = online_slot(
            step, record.online, record.steps, self.max_steps
        )
        keep = first_attempt & keep
        states = jtu.tree_map(
            lambda x, buf: buf.at[slot].set(x, pred=keep),
            stepping_of(state),
            record.states,
        )
        return Checkpoints(
            steps=jnp.where(keep, record.steps.at[slot].set(step), record.steps),
            states=states,
            online=jtu.tree_map(
                lambda new, old: jnp.where(first_attempt, new, old),
                online,
                record.online,
            ),
            next_step=jnp.where(first_attempt, step + 1, record.next_step),
        )


def solve(
    *, num_slots: int | None, max_steps, loop_kwargs: dict, keep_states: bool = True
):
    """Run Diffrax's solve loop; return its `(final_state, aux_stats)` and the record:
    a `StepRecord` if `num_slots` is `None` (its states `None` unless `keep_states`),
    else `num_slots` sorted `Checkpoints`."""
    recorder: Any
    if num_slots is None:
        recorder = _EveryStep(max_steps, keep_states)
    else:
        recorder = _Online(num_slots, max_steps)
    records = []

    def outer_while_loop(cond_fun, body_fun, init_val, *, max_steps, buffers):
        def body(carry):
            state, record = carry
            return body_fun(state), recorder.update(record, state)

        final_state, record = eqxi.while_loop(
            lambda carry: cond_fun(carry[0]),
            body,
            (init_val, recorder.init(init_val)),
            max_steps=max_steps,
            buffers=lambda carry: (buffers(carry[0]), recorder.buffers(carry[1])),
            kind="lax",
        )
        records.append(record)  # read once the loop has returned, in the same trace
        return final_state

    final_state, aux_stats = private.loop(
        max_steps=max_steps,
        inner_while_loop=ft.partial(eqxi.while_loop, kind="lax"),
        outer_while_loop=outer_while_loop,
        **loop_kwargs,
    )
    (record,) = records
    if num_slots is not None:
        record = _sorted(record, final_state.num_accepted_steps)
    return final_state, aux_stats, record


def _sorted(checkpoints: Checkpoints, num_steps) -> Checkpoints:
    """Slots in step order, unused ones (and the start of a step never completed, when
    `max_steps` stopped the loop) last, as the backward pass reads them like a stack."""
    steps = jnp.where(checkpoints.steps < num_steps, checkpoints.steps, NEVER)
    order = jnp.argsort(steps)
    states = jtu.tree_map(lambda x: x[order], checkpoints.states)
    return checkpoints._replace(steps=steps[order], states=states)


class Stepper(eqx.Module):
    """One attempted step of Diffrax's solve loop, recomputed from a `Stepping`: the
    same solver step, controller decision and clipping at t1, so the same steps."""

    terms: Any
    solver: Any  # an explicit Runge--Kutta solver
    controller: Any  # a diffrax.AbstractStepSizeController
    args: Any
    t1: Any
    t1_clip_floor: Any

    def attempt(self, s: Stepping):
        """`(accepted, next Stepping, the step's (t0, t1, y0, y1, dense info))`."""
        y1, y_error, dense_info, solver_state, _ = self.solver.step(
            self.terms, s.tprev, s.tnext, s.y, self.args, s.solver_state, s.made_jump
        )
        y_error = jtu.tree_map(lambda x: jnp.where(jnp.isnan(x), jnp.inf, x), y_error)
        keep, tprev, tnext, made_jump, controller_state, _ = (
            self.controller.adapt_step_size(
                s.tprev,
                s.tnext,
                s.y,
                y1,
                self.args,
                y_error,
                self.solver.error_order(self.terms),
                s.controller_state,
            )
        )
        tprev = jnp.minimum(tprev, self.t1)
        tnext = private.clip_to_end(tprev, tnext, self.t1, self.t1_clip_floor, keep)
        keep_if = lambda new, old: jnp.where(keep, new, old)
        after = Stepping(
            tprev,
            tnext,
            jtu.tree_map(keep_if, y1, s.y),
            jtu.tree_map(keep_if, solver_state, s.solver_state),
            controller_state,
            jnp.where(keep, made_jump, s.made_jump),
        )
        return keep, after, (s.tprev, s.tnext, s.y, y1, dense_info)

    def accepted_step(self, s: Stepping, active=True):
        """The accepted step from `s`, after any rejected attempts: the next
        `Stepping` and the step's `(t0, t1, y0, y1, dense info)`. (Where `active` is
        false, under `vmap`, the first attempt is taken as it is.)"""
        keep, after, step = self.attempt(s)

        def retry(carry):
            _, after, _ = carry
            return self.attempt(after)

        _, after, step = eqxi.while_loop(
            lambda carry: active & ~carry[0], retry, (keep, after, step), kind="lax"
        )
        return after, step


def make_stepper(terms, solver, controller, args, t1) -> Stepper:
    # As Diffrax's loop: a step proposed to end within 100 ULPs of t1 ends at t1.
    t1_clip_floor = t1
    for _ in range(100):
        t1_clip_floor = eqxi.prevbefore(t1_clip_floor)
    return Stepper(terms, solver, controller, args, t1, t1_clip_floor)
