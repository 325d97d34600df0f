"""The backward pass: the steps pulled back last to first, on one of two schedules.

- Every step recorded: step n's start y_n and interval are read from the record.
- Checkpoints: treeverse. The latest checkpoint before the step that carries the
  cotangent is restored, and the solve recomputed from it (keeping new checkpoints
  where `_schedule.next_checkpoint` says) up to that step, which is then pulled back;
  the checkpoint is dropped once the steps after it are all pulled back.

Either way one step's pullback (`StepPullback`) recomputes the step's stages (or takes
them from the recomputed step), adds the cotangents of the step's outputs, and runs
the stages' VJPs one at a time (`_tableau.py`).
"""

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._outputs import Outputs, index
from ._record import Checkpoints, Stepper, StepRecord
from ._schedule import next_checkpoint
from ._tableau import (
    ExplicitTableau,
    outer_weights,
    pullback_stages,
    recompute_stages,
    unrolled_stages,
)


class StepPullback:
    """Reverse mode through one accepted step, with the cotangents of its outputs."""

    def __init__(
        self,
        tableau: ExplicitTableau,
        outputs: Outputs,
        params,
        static,
        step_activations: bool = False,
    ):
        self.tableau = tableau
        self.step_activations = step_activations
        self.outputs = outputs
        self.params, self.static = params, static
        # y_{n+1} may not need the last stage (FSAL); interpolating needs every one.
        self.solution_stages = tableau.stages_for_solution()
        if outputs.interpolates:
            self.num_stages = tableau.num_stages
        else:
            self.num_stages = self.solution_stages

    def vf_prod(self, params, t, y, t_start, t_end):
        _args, _terms, _, _ = eqx.combine(params, self.static)
        return _terms.vf_prod(t, y, _args, _terms.contr(t_start, t_end))

    def __call__(self, n, step, ks, carry, num_steps):
        """Pull back step `n` (`step` = (t_start, t_end, y_start, y_end); `ks` its
        stages, or `None` to recompute them): `carry` = (ts_indices, λ, params_bar)
        with λ = ∂L/∂y_{n+1} becomes the same with λ = ∂L/∂y_n."""
        ts_indices, lam, params_bar = carry
        t_start, t_end, y_start, _ = step
        if self.step_activations:
            ks, pull_stages = self._whole_step(step)
        else:
            ks, pull_stages = self._stage_by_stage(n, step, ks, ts_indices, num_steps)
        y_start_bar = jtu.tree_map(jnp.zeros_like, y_start)
        k_bar = jtu.tree_map(jnp.zeros_like, ks)
        cotangents = (ts_indices, y_start_bar, lam, k_bar, params_bar)
        ts_indices, y_start_bar, lam, k_bar, params_bar = self.outputs.in_step(
            n, step, ks, cotangents, num_steps
        )
        b = jnp.asarray(self.tableau.b[: self.num_stages])
        k_bar = jtu.tree_map(lambda kb, lm: kb + outer_weights(b, lm), k_bar, lam)
        y_bar_sum, params_bar = pull_stages(k_bar, params_bar)
        lam = jtu.tree_map(lambda *x: sum(x), lam, y_bar_sum, y_start_bar)
        return ts_indices, lam, params_bar

    def _whole_step(self, step):
        """The stages, recomputed under one VJP of the whole step (every stage's
        activations kept), and the pullback of their cotangents."""
        t_start, t_end, y_start, _ = step
        ks, stages_vjp = jax.vjp(
            lambda y, p: unrolled_stages(
                self.tableau,
                self.num_stages,
                lambda t, y_: self.vf_prod(p, t, y_, t_start, t_end),
                t_start,
                t_end,
                y,
            ),
            y_start,
            self.params,
        )

        def pull_stages(k_bar, params_bar):
            y_bar, params_bar_step = stages_vjp(k_bar)
            return y_bar, jtu.tree_map(jnp.add, params_bar, params_bar_step)

        return ks, pull_stages

    def _stage_by_stage(self, n, step, ks, ts_indices, num_steps):
        """The stages, recomputed without residuals (or `ks` given), and the pullback
        of their cotangents one VJP of f at a time (one evaluation's activations)."""
        t_start, t_end, y_start, _ = step
        ks, num_pulled = self._stages(n, step, ks, ts_indices, num_steps)

        def vf_prod_vjp(t, y, cotangent):
            _, vjp = jax.vjp(
                lambda y_, p_: self.vf_prod(p_, t, y_, t_start, t_end), y, self.params
            )
            return vjp(cotangent)

        def pull_stages(k_bar, params_bar):
            return pullback_stages(
                self.tableau,
                self.num_stages,
                vf_prod_vjp,
                t_start,
                t_end,
                y_start,
                ks,
                k_bar,
                params_bar,
                num_pulled=num_pulled,
            )

        return ks, pull_stages

    def _stages(self, n, step, ks, ts_indices, num_steps):
        """The step's stages (recomputed without residuals, or `ks` given) and how
        many of them carry cotangents: a step that is interpolated needs every stage;
        otherwise y_{n+1} needs `solution_stages`, and their pullback every k but the
        last."""
        t_start, t_end, y_start, _ = step
        interpolated = self.outputs.interpolated(n, t_start, ts_indices, num_steps)
        if interpolated is True:
            num_pulled = num_computed = self.num_stages
        elif interpolated is False:
            num_pulled = self.solution_stages
            num_computed = self.solution_stages - 1
        else:
            num_pulled = jnp.where(interpolated, self.num_stages, self.solution_stages)
            num_computed = jnp.where(
                interpolated, self.num_stages, self.solution_stages - 1
            )
        if ks is not None:
            return jtu.tree_map(lambda k: k[: self.num_stages], ks), num_pulled
        ks = recompute_stages(
            self.tableau,
            self.num_stages,
            lambda t, y: self.vf_prod(self.params, t, y, t_start, t_end),
            t_start,
            t_end,
            y_start,
            num_computed=num_computed,
        )
        return ks, num_pulled


def every_step_reverse(
    pull: StepPullback, record: StepRecord, y_last, num_steps, carry
):
    """Pull back steps `num_steps - 1, ..., 0`, each read from `record`; `y_last` is
    the end of the last one."""

    def body(state):
        n, carry = state
        after = jnp.minimum(n + 1, record.t_start.shape[0] - 1)
        y_end = jtu.tree_map(
            lambda last, buf: jnp.where(n == num_steps - 1, last, buf[after]),
            y_last,
            record.y_start,
        )
        step = (record.t_start[n], record.t_end[n], index(record.y_start, n), y_end)
        return n - 1, pull(n, step, None, carry, num_steps)

    _, carry = lax.while_loop(lambda s: s[0] >= 0, body, (num_steps - 1, carry))
    return carry


def checkpointed_reverse(
    pull: StepPullback, stepper: Stepper, checkpoints: Checkpoints, num_steps, carry
):
    """Pull back steps `num_steps - 1, ..., 0` by treeverse from `checkpoints`."""
    num_slots = checkpoints.steps.shape[0]
    # Inside the loops the slots are wrapped as buffers: read them through the
    # structure of the plain states.
    treedef = jtu.tree_structure(checkpoints.states)
    read = lambda states, i: jtu.tree_unflatten(
        treedef, [buf[i] for buf in treedef.flatten_up_to(states)]
    )

    def pull_back_one(state):
        step_grad, num_kept, steps, states, carry = state
        active = step_grad > 0
        top = jnp.maximum(num_kept - 1, 0)
        step_val = steps[top]
        # Recompute from the latest checkpoint to the start of step `step_grad - 1`.
        keep_at = next_checkpoint(step_val, step_grad, num_kept, num_slots)
        advance = _advance(stepper, step_grad, num_slots, active)
        _, val, num_kept, _, steps, states = eqxi.while_loop(
            lambda s: active & (s[0] < step_grad - 1),
            advance,
            (step_val, read(states, top), num_kept, keep_at, steps, states),
            buffers=lambda s: s[5],
            kind="lax",
        )
        _, (t_start, t_end, y_start, y_end, info) = stepper.accepted_step(val, active)
        carry = pull(
            step_grad - 1,
            (t_start, t_end, y_start, y_end),
            info.get("k"),
            carry,
            num_steps,
        )
        step_grad = step_grad - 1
        # A checkpoint at the start of that step is needed no more.
        top = jnp.maximum(num_kept - 1, 0)
        num_kept = jnp.where(steps[top] >= step_grad, top, num_kept)
        return step_grad, num_kept, steps, states, carry

    num_kept = jnp.sum(checkpoints.steps < num_steps).astype(checkpoints.steps.dtype)
    state = (num_steps, num_kept, checkpoints.steps, checkpoints.states, carry)
    *_, carry = eqxi.while_loop(
        lambda s: s[0] > 0,
        pull_back_one,
        state,
        buffers=lambda s: s[3],
        kind="lax",
    )
    return carry


def _advance(stepper: Stepper, step_grad, num_slots: int, active):
    """One recomputed step towards `step_grad - 1`, kept as a checkpoint if it is
    where treeverse placed the next one (`keep_at`)."""

    def advance(state):
        step_val, val, num_kept, keep_at, steps, states = state
        val, _ = stepper.accepted_step(val, active)
        step_val = step_val + 1
        keep = step_val == keep_at
        states = jtu.tree_map(
            lambda x, buf: buf.at[num_kept].set(x, pred=keep), val, states
        )
        steps = jnp.where(keep, steps.at[num_kept].set(step_val), steps)
        num_kept = jnp.where(keep, num_kept + 1, num_kept)
        keep_at = jnp.where(
            keep, next_checkpoint(step_val, step_grad, num_kept, num_slots), keep_at
        )
        return step_val, val, num_kept, keep_at, steps, states

    return advance
