"""Discretise-then-optimise with every intermediate kept: plain backpropagation.

The solve loop becomes one `lax.scan` of `max_steps` iterations (and the Runge--Kutta
stages one scan of `s` iterations) with no checkpointing, so reverse mode stores the
activations of every evaluation of f_θ: memory O(n·s·m·d) for n steps, s stages, m layers
of width d. It is the fastest exact gradient and the baseline the other strategies save
memory against.
"""

import diffrax
import equinox as eqx
import equinox.internal as eqxi

from . import _diffrax_private as private


def _is_none(x):
    return x is None


class BackpropAdjoint(diffrax.AbstractAdjoint):
    """Backpropagate through every step of the solve, storing every intermediate value.

    Exact for the discretisation (identical to `diffrax.RecursiveCheckpointAdjoint`) and
    the fastest strategy, at memory O(n·s·m·d). It also supports forward mode
    (`jax.jvp`). Requires a finite `diffeqsolve(..., max_steps=...)`: that many steps are
    allocated, whether taken or not, so keep it close to the number of steps you need.
    """

    def loop(
        self,
        *,
        solver,
        max_steps,
        throw,
        passed_solver_state,
        passed_controller_state,
        **kwargs,
    ):
        del throw, passed_solver_state, passed_controller_state
        if max_steps is None:
            raise ValueError(
                "BackpropAdjoint needs `diffeqsolve(..., max_steps=<int>)`: it stores "
                "every step, so it must know how many to allocate. Pass max_steps, or use "
                "neuralode.SymplecticAdjoint / diffrax.RecursiveCheckpointAdjoint."
            )
        if isinstance(solver, diffrax.AbstractRungeKutta) and solver.scan_kind is None:
            # One un-checkpointed scan over the stages: every stage's activations kept.
            solver = eqx.tree_at(
                lambda s: s.scan_kind, solver, "bounded", is_leaf=_is_none
            )
        return private.loop(
            solver=solver,
            max_steps=max_steps,
            inner_while_loop=_single_scan,
            outer_while_loop=_single_scan,
            **kwargs,
        )


def _single_scan(cond_fun, body_fun, init_val, *, max_steps, buffers, checkpoints=None):
    # A bounded loop whose base is its length: one `lax.scan`, no checkpoints.
    del checkpoints
    return eqxi.while_loop(
        cond_fun,
        body_fun,
        init_val,
        max_steps=max_steps,
        buffers=buffers,
        kind="bounded",
        base=max(max_steps, 2),
    )
