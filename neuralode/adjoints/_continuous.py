"""The continuous adjoint (optimise-then-discretise): Diffrax's `BacksolveAdjoint`.

The adjoint a(t) = ∂L/∂y(t) solves da/dt = −a·∂f/∂y backwards from t1 alongside y itself
(recomputed backwards) and the parameter cotangent, dθ̄/dt = −a·∂f/∂θ (Pontryagin; Chen et
al. 2018). Memory does not depend on the number of steps, but the recomputed backward
trajectory differs from the forward one, so the gradient is only as accurate as the
tolerances of both solves.
"""

from typing import Any

import diffrax
import jax.tree_util as jtu
from jaxtyping import ArrayLike, PyTree, Real

from . import _diffrax_private as private
from ._closure import closure_convert_terms
from ._constant_inputs import constant_paths, constant_times, forward_only
from ._input_checks import checked_inputs


class ContinuousAdjoint(diffrax.AbstractAdjoint):
    """`diffrax.BacksolveAdjoint`, accepting vector fields that close over arrays.

    **Arguments:**

    - `backsolve`: the configured `diffrax.BacksolveAdjoint` that does the work;
        `diffrax.BacksolveAdjoint()` by default (the backward solve then uses the
        forward solve's solver and step control). `neuralode.get_adjoint("continuous",
        ...)` builds one from tolerances.

    Like `diffrax.BacksolveAdjoint`, it does not compute gradients with respect to
    `t0`, `t1`, `dt0`, the save times, `step_ts`, `jump_ts` or the data of a control
    path (a neural CDE's interpolation coefficients, for which
    `diffrax.BacksolveAdjoint` returns zero): differentiating through them raises
    `NotImplementedError`. What `diffrax.BacksolveAdjoint` cannot differentiate
    (`SaveAt(steps=...)`, `SaveAt(fn=...)`, `SaveAt(subs=...)`, dense output, events,
    solvers taking several terms, Itô SDE solvers) is solved as by any adjoint, and
    only differentiating it raises `NotImplementedError`.

    ??? cite "References"

        ```bibtex
        @inproceedings{chen2018neural,
            title = {Neural Ordinary Differential Equations},
            author = {Chen, Ricky T. Q. and Rubanova, Yulia and Bettencourt, Jesse and
                      Duvenaud, David},
            booktitle = {Advances in Neural Information Processing Systems},
            year = {2018},
        }

        @inproceedings{kidger2021hey,
            title = {``Hey, that's not an ODE'': Faster ODE Adjoints via Seminorms},
            author = {Kidger, Patrick and Chen, Ricky T. Q. and Lyons, Terry},
            booktitle = {International Conference on Machine Learning},
            year = {2021},
        }
        ```
    """

    backsolve: diffrax.BacksolveAdjoint = diffrax.BacksolveAdjoint()

    def __check_init__(self):
        if not isinstance(self.backsolve, diffrax.BacksolveAdjoint):
            raise ValueError(
                "ContinuousAdjoint: `backsolve` must be a diffrax.BacksolveAdjoint, got "
                f"{self.backsolve!r}."
            )

    def loop(
        self,
        *,
        terms: PyTree[diffrax.AbstractTerm],
        args: PyTree,
        init_state: Any,
        t0: Real[ArrayLike, ""],
        t1: Real[ArrayLike, ""],
        dt0: Real[ArrayLike, ""] | None,
        saveat: diffrax.SaveAt,
        stepsize_controller: diffrax.AbstractStepSizeController,
        **kw: Any,
    ) -> Any:
        name = "ContinuousAdjoint"
        init_state = checked_inputs(init_state, terms, args, t0, kw["throw"])
        t0, t1, dt0, saveat, stepsize_controller = constant_times(
            name, t0, t1, dt0, saveat, stepsize_controller
        )
        unsupported = _unsupported(terms, kw["solver"], saveat, kw["event"])
        if unsupported is not None:
            return forward_only(
                unsupported,
                terms=terms,
                args=args,
                init_state=init_state,
                t0=t0,
                t1=t1,
                dt0=dt0,
                saveat=saveat,
                stepsize_controller=stepsize_controller,
                **_loop_arguments(kw),
            )
        terms = constant_paths(name, terms)
        terms = closure_convert_terms(terms, init_state.tprev, init_state.y, args)
        return self.backsolve.loop(
            terms=terms,
            args=args,
            init_state=init_state,
            t0=t0,
            t1=t1,
            dt0=dt0,
            saveat=saveat,
            stepsize_controller=stepsize_controller,
            **kw,
        )


def _loop_arguments(kw: dict) -> dict:
    """The keyword arguments of `AbstractAdjoint.loop` that Diffrax's loop takes."""
    unused = ("throw", "passed_solver_state", "passed_controller_state")
    return {key: value for key, value in kw.items() if key not in unused}


def _unsupported(terms, solver, saveat: diffrax.SaveAt, event) -> str | None:
    """What `diffrax.BacksolveAdjoint` refuses to differentiate, or `None`."""
    is_sub = lambda x: isinstance(x, diffrax.SubSaveAt)
    subs = jtu.tree_leaves(saveat.subs, is_leaf=is_sub)
    if len(subs) != 1 or not is_sub(saveat.subs):
        what = "`SaveAt(subs=...)`"
    elif saveat.dense or subs[0].steps:
        what = "`SaveAt(steps=...)` or `SaveAt(dense=True)`"
    elif subs[0].fn is not private.save_y:
        what = "`SaveAt(fn=...)`"
    elif event is not None:
        what = "an event"
    elif private.is_unsafe_sde(terms):
        what = "`UnsafeBrownianPath`"
    elif private.is_sde(terms) and isinstance(solver, diffrax.AbstractItoSolver):
        what = f"the Itô SDE solver {type(solver).__name__}"
    elif isinstance(solver, diffrax.AbstractSRK) or (
        jtu.tree_structure(solver.term_structure) != jtu.tree_structure(0)
    ):
        what = f"the solver {type(solver).__name__}, which takes several terms"
    else:
        return None
    return (
        f"ContinuousAdjoint (diffrax.BacksolveAdjoint) cannot differentiate a solve "
        f"with {what}. Use `adjoint=neuralode.SymplecticAdjoint()` or "
        "`adjoint=diffrax.RecursiveCheckpointAdjoint()` instead. (Solving without "
        "differentiating works as with any adjoint.)"
    )
