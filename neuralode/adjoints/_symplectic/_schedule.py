"""Where to keep checkpoints: the online schedule of the forward pass and the treeverse
placement of the backward pass (binomial checkpointing, Griewank & Walther 2000).

The number of steps a solve takes is not known until it ends, so the forward pass
decides online which step starts to keep in its `c` slots: Algorithm I of Stumm & Walther
(2010) while the solve has fewer than (c + 1)(c + 2)/2 steps (then each step is
recomputed at most twice), and the dynamic rule of Wang & Moin (2008) beyond. The
backward pass reverses the steps from the last one kept, placing the checkpoints it
creates on the way by bisection, or one per step when the remaining slots allow.

These are the rules of `equinox.internal.while_loop(kind="checkpointed")`, which
Diffrax's `RecursiveCheckpointAdjoint` uses, written here over the *accepted* steps of
each solve (so they may differ between the members of a `vmap`) rather than over loop
iterations.

??? cite "References"

    ```bibtex
    @article{griewank2000revolve,
        title = {Algorithm 799: revolve: an implementation of checkpointing for the
                 reverse or adjoint mode of computational differentiation},
        author = {Griewank, Andreas and Walther, Andrea},
        journal = {ACM Trans. Math. Softw.},
        volume = {26},
        number = {1},
        pages = {19--45},
        year = {2000},
    }

    @article{stumm2010online,
        title = {New Algorithms for Optimal Online Checkpointing},
        author = {Stumm, Philipp and Walther, Andrea},
        journal = {SIAM J. Sci. Comput.},
        volume = {32},
        number = {2},
        pages = {836--854},
        year = {2010},
    }

    @article{wang2008minimal,
        title = {Minimal repetition dynamic checkpointing algorithm for unsteady
                 adjoint calculation},
        author = {Wang, Qiqi and Moin, Parviz},
        journal = {Center for Turbulence Research Annual Research Briefs},
        year = {2008},
    }
    ```
"""

import math
from typing import NamedTuple

import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

STEP_DTYPE = jnp.int32
NEVER = jnp.iinfo(STEP_DTYPE).max  # the step of an empty slot, or of no next checkpoint


def default_checkpoints(max_steps: int) -> int:
    """Diffrax's default: the fewest slots c with max_steps < (c + 1)(c + 2)/2, so that
    any solve within `max_steps` recomputes each step at most twice."""
    if max_steps == 1:
        return 1
    return math.floor(-1.5 + math.sqrt(2 * max_steps + 0.25)) + 1


class OnlineState(NamedTuple):
    """Stumm--Walther's counters (i, o, p, s) and Wang--Moin's levels per slot."""

    sw_i: Int[Array, ""]
    sw_o: Int[Array, ""]
    sw_p: Int[Array, ""]
    sw_save: Bool[Array, ""]
    levels: Int[Array, " c"]
    dispensable: Bool[Array, " c"]


def online_init(num_slots: int) -> OnlineState:
    c = jnp.asarray(num_slots, STEP_DTYPE)
    return OnlineState(
        sw_i=jnp.zeros((), STEP_DTYPE),
        sw_o=c,
        sw_p=c,
        sw_save=jnp.asarray(True),
        levels=jnp.zeros(num_slots, STEP_DTYPE).at[0].set(NEVER),
        dispensable=jnp.zeros(num_slots, bool),
    )


def online_slot(step, state: OnlineState, slot_steps, max_steps: int | None):
    """Whether to keep the start of accepted step `step` (0, 1, 2, ... in turn), in
    which slot, and the updated state."""
    num_slots = slot_steps.shape[0]
    u2_minus_1 = (num_slots + 1) * (num_slots + 2) // 2 - 1
    if max_steps is not None and max_steps <= u2_minus_1:
        return _stumm_walther(step, state)  # every solve stays in its range
    return lax.cond(
        step >= u2_minus_1, _wang_moin, _stumm_walther_of, step, state, slot_steps
    )


def _stumm_walther_of(step, state, slot_steps):
    del slot_steps
    return _stumm_walther(step, state)


def _stumm_walther(step, state: OnlineState):
    """Algorithm I of Stumm & Walther (2010)."""
    i, o, p, s = state.sw_i, state.sw_o, state.sw_p, state.sw_save
    save, slot = s, i
    i = jnp.where(s, i + 1, i)
    i = jnp.where(s & (i > o), 1, i)
    s = jnp.where(step + 1 == p, False, s)
    reached = step == p
    p = jnp.where(reached, p + o, p)
    o = jnp.where(reached, o - 1, o)
    i = jnp.where(reached, o, i)
    s = jnp.where(reached, o > 0, s)
    return save, slot, state._replace(sw_i=i, sw_o=o, sw_p=p, sw_save=s)


def _wang_moin(step, state: OnlineState, slot_steps):
    """Algorithm 1 of Wang & Moin (2008): replace a dispensable checkpoint, or else the
    latest, one level up."""
    del step
    if slot_steps.shape[0] == 1:  # the one slot holds the initial state
        return jnp.asarray(False), jnp.zeros((), STEP_DTYPE), state
    levels, dispensable = state.levels, state.dispensable
    any_dispensable = jnp.any(dispensable)
    slot = jnp.where(
        any_dispensable,
        jnp.argmax(jnp.where(dispensable, slot_steps, 0)),
        jnp.argmax(slot_steps),
    ).astype(STEP_DTYPE)
    level = jnp.where(any_dispensable, 0, levels[slot] + 1)
    dispensable = jnp.where(
        any_dispensable,
        dispensable.at[slot].set(False),
        jnp.where(levels < levels[slot], True, dispensable),
    )
    state = state._replace(levels=levels.at[slot].set(level), dispensable=dispensable)
    return jnp.asarray(True), slot, state


def next_checkpoint(step_val, step_grad, num_kept, num_slots: int):
    """Treeverse: the step at which to keep the next checkpoint while recomputing from
    `step_val` towards the step `step_grad` that carries the cotangent, with `num_kept`
    of the `num_slots` slots in use (`NEVER`: none is worth keeping)."""
    bisect = step_val + (step_grad - step_val) // 2
    # One per step when they all fit: then nothing is recomputed twice.
    fits = (step_grad - step_val - 2) <= (num_slots - num_kept)
    step = jnp.where(fits, step_val + 1, bisect)
    # The next step, or the one after, is reached without a checkpoint.
    useless = (num_kept == num_slots) | (step_grad - step_val <= 2)
    return jnp.where(useless, NEVER, step)
