"""`NeuralODE`: a vector field, a Diffrax solver, a step-size controller and a gradient
strategy, mapping y0 to y(ts)."""

from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree, Real

from ._checks import as_int
from .adjoints import (
    ADJOINT_NAMES,
    Reversible,
    ReversibleAdjoint,
    get_adjoint,
)
from .adjoints._input_checks import (
    check_vector_field,
    error_through_scalar,
    finite_or_raise,
)


class NeuralODE(eqx.Module):
    """The neural ODE dy/dt = field(t, y, args), solved from `ts[0]` and saved at `ts`.

    **Arguments:**

    - `field`: the vector field, called as `field(t, y, args)` (e.g. `neuralode.MLPField`).
    - `solver`: a Diffrax solver; `diffrax.Tsit5()` by default.
    - `adjoint`: the gradient strategy: a name from `neuralode.ADJOINT_NAMES` or any
        `diffrax.AbstractAdjoint`. `"symplectic"` by default. `"reversible"` needs a
        `neuralode.Reversible` solver.
    - `stepsize_controller`: `diffrax.ConstantStepSize()` by default (then `dt0` is
        needed), or e.g. `diffrax.PIDController(rtol=1e-5, atol=1e-5)`.
    - `dt0`: the initial (or constant) step size; `None` lets an adaptive controller choose.
    - `max_steps`: the bound on steps. The memory of `backprop` and `symplectic` is
        proportional to it, so keep it near the steps you need.

    Call it as `model(ts, y0, args=None)` to get `ys` of shape `(len(ts), *y0.shape)`,
    with `ts` increasing (or decreasing, with a negative `dt0`);
    `model.solve(ts, y0, args)` returns the whole `diffrax.Solution` (with its step
    statistics). It works under `jax.jit`, `jax.vmap` and `eqx.filter_grad`.
    """

    field: Callable[..., PyTree[Array]]
    solver: diffrax.AbstractSolver
    adjoint: diffrax.AbstractAdjoint
    stepsize_controller: diffrax.AbstractStepSizeController
    dt0: float | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)

    def __init__(
        self,
        field: Callable[..., PyTree[Array]],
        *,
        solver: diffrax.AbstractSolver | None = None,
        adjoint: str | diffrax.AbstractAdjoint = "symplectic",
        stepsize_controller: diffrax.AbstractStepSizeController | None = None,
        dt0: float | int | None = None,
        max_steps: int | np.integer = 4096,
    ) -> None:
        if not callable(field):
            raise ValueError(
                f"NeuralODE: `field` must be callable as field(t, y, args), got "
                f"{field!r}."
            )
        self.field = field
        self.solver = diffrax.Tsit5() if solver is None else solver
        if not isinstance(self.solver, diffrax.AbstractSolver):
            raise ValueError(
                f"NeuralODE: `solver` must be a diffrax solver such as "
                f"diffrax.Tsit5(), got {solver!r}."
            )
        if isinstance(adjoint, str):
            adjoint = get_adjoint(adjoint)
        if not isinstance(adjoint, diffrax.AbstractAdjoint):
            raise ValueError(
                f"NeuralODE: `adjoint` must be one of {list(ADJOINT_NAMES)} or a "
                f"diffrax.AbstractAdjoint, got {adjoint!r}."
            )
        if isinstance(adjoint, ReversibleAdjoint) and not isinstance(
            self.solver, Reversible
        ):
            raise ValueError(
                "NeuralODE: the reversible adjoint differentiates a "
                "`neuralode.Reversible` solver only; pass "
                f"solver=neuralode.Reversible({type(self.solver).__name__}()) (or "
                "`adjoint.wrap(solver)`): the reversible scheme built on it, whose "
                "solution differs from the plain solver's."
            )
        self.adjoint = adjoint
        if stepsize_controller is None:
            stepsize_controller = diffrax.ConstantStepSize()
        if not isinstance(stepsize_controller, diffrax.AbstractStepSizeController):
            raise ValueError(
                f"NeuralODE: `stepsize_controller` must be a diffrax step-size "
                f"controller such as diffrax.PIDController(rtol=1e-5, atol=1e-5), got "
                f"{stepsize_controller!r}."
            )
        self.stepsize_controller = stepsize_controller
        if isinstance(stepsize_controller, diffrax.ConstantStepSize) and dt0 is None:
            raise ValueError(
                "NeuralODE: a constant step size needs `dt0`; pass dt0=... or an adaptive "
                "stepsize_controller such as diffrax.PIDController(rtol=1e-5, atol=1e-5)."
            )
        self.dt0 = dt0
        self.max_steps = as_int("NeuralODE", "max_steps", max_steps)

    def solve(
        self, ts: Real[ArrayLike, " times"], y0: PyTree[ArrayLike], args: Any = None
    ) -> diffrax.Solution:
        ts = jnp.asarray(ts)
        if ts.ndim != 1 or ts.shape[0] < 2:
            raise ValueError(
                f"NeuralODE: `ts` must be a 1-D array of at least two times, got shape {ts.shape}."
            )
        term = diffrax.ODETerm(self.field)
        # Before Diffrax, which broadcasts the field's output to the state's shape.
        check_vector_field(term, y0, args, ts[0])
        # Diffrax's run-time checks (`throw=True`) would gather a batch sharded over
        # devices (see `adjoints._input_checks`): the same checks, through a scalar.
        y0 = finite_or_raise(y0, term, args)
        sol = diffrax.diffeqsolve(
            term,
            self.solver,
            t0=ts[0],
            t1=ts[-1],
            dt0=self.dt0,
            y0=y0,
            args=args,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=self.stepsize_controller,
            adjoint=self.adjoint,
            max_steps=self.max_steps,
            throw=False,
        )
        return _raise_if_failed(sol)

    def __call__(
        self, ts: Real[ArrayLike, " times"], y0: PyTree[ArrayLike], args: Any = None
    ) -> PyTree[Array]:
        """`ys`, the states at `ts`: `self.solve(ts, y0, args).ys`."""
        return self.solve(ts, y0, args).ys


def _raise_if_failed(sol: diffrax.Solution) -> diffrax.Solution:
    """`sol`, its `ys` raising Diffrax's error if the solve failed (as `throw=True`)."""
    failed = jnp.invert(diffrax.is_okay(sol.result))
    check = lambda one: sol.result.error_if(one, failed)  # noqa: E731
    return eqx.tree_at(lambda s: s.ys, sol, error_through_scalar(check, sol.ys))
