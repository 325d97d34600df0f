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
from ._input_checks import checked_inputs


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
        del passed_solver_state, passed_controller_state
        kwargs["init_state"] = checked_inputs(
            kwargs["init_state"], kwargs["terms"], kwargs["args"], kwargs["t0"], throw
        )
        if max_steps is None:
            raise ValueError(
                "BackpropAdjoint needs `diffeqsolve(..., max_steps=<int>)`: it stores "
                "every step, so it must know how many to allocate. Pass max_steps, or use "
                "neuralode.SymplecticAdjoint / diffrax.RecursiveCheckpointAdjoint."
            )
        return private.loop(
            solver=_stages_kept(solver),
            max_steps=max_steps,
            inner_while_loop=_single_scan,
            outer_while_loop=_single_scan,
            **kwargs,
        )


def _stages_kept(solver: diffrax.AbstractSolver) -> diffrax.AbstractSolver:
    """`solver` with its loop over the stages un-checkpointed, so that every stage's
    activations are kept (and forward mode sees no custom VJP), also inside wrappers
    such as `diffrax.HalfSolver`."""
    if isinstance(solver, diffrax.AbstractWrappedSolver):
        return eqx.tree_at(lambda s: s.solver, solver, _stages_kept(solver.solver))
    kind = None
    if isinstance(solver, diffrax.AbstractRungeKutta):
        kind = "bounded"
    elif isinstance(solver, diffrax.AbstractSRK):
        kind = "lax"  # its only un-checkpointed scan
    if kind is None or getattr(solver, "scan_kind", None) is not None:
        return solver
    return eqx.tree_at(lambda s: s.scan_kind, solver, kind, is_leaf=_is_none)


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
