"""`Reversible`: an explicit Runge--Kutta solver made algebraically reversible, its
interpolation between steps, and the closed-form inverse of its step (the maths is in
the package's docstring)."""

from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from .._symplectic._outputs import rk_dense_info
from .._symplectic._tableau import (
    ExplicitTableau,
    explicit_tableau,
    recompute_stages,
    step_end,
)

DEFAULT_COUPLING = 0.999


def check_coupling(owner: str, coupling) -> None:
    """Raise `ValueError` unless `coupling` is a number λ with 0 < λ <= 1."""
    if (
        isinstance(coupling, bool)
        or not isinstance(coupling, int | float)
        or not 0 < coupling <= 1
    ):
        raise ValueError(
            f"{owner}: `coupling` must be a number λ with 0 < λ <= 1 (default "
            f"{DEFAULT_COUPLING}), got {coupling!r}."
        )


class Reversible(diffrax.AbstractSolver):
    """An explicit Runge--Kutta solver made algebraically reversible (McCallum &
    Foster): each step can be undone exactly, in closed form, so that
    `neuralode.ReversibleAdjoint` computes the exact gradient without storing the
    trajectory.

    The solver carries a second state z beside the solution y (z_0 = y_0) and takes
    two steps of the wrapped solver per step, one forward from z_n and one backward
    from y_{n+1}:

        y_{n+1} = λ y_n + (1 − λ) z_n + Ψ_h(t_n, z_n),
        z_{n+1} = z_n − Ψ_{−h}(t_{n+1}, y_{n+1}),

    where y ↦ y + Ψ_h(t, y) is one step of the wrapped solver. It converges at the
    wrapped solver's order, but it is a different discretisation: its solution and
    gradients are not those of `solver` (compare gradients with
    `diffrax.RecursiveCheckpointAdjoint()` on `Reversible(solver)`, which is its
    reference). It works under any Diffrax adjoint, and costs two steps of `solver`
    per step (2·s evaluations of the vector field for s stages; no
    first-same-as-last saving). Adaptive step control uses the error estimate of the
    forward step from z_n; between steps the solution is the wrapped solver's
    interpolation of that step, shifted linearly to meet y_n and y_{n+1}.

    **Arguments:**

    - `solver`: an explicit Runge--Kutta solver: `diffrax.Euler`, `Heun`,
        `Midpoint`, `Ralston`, `Bosh3`, `Tsit5`, `Dopri5`, `Dopri8`, or a
        `diffrax.AbstractERK` with your own `ButcherTableau` that keeps Diffrax's
        step.
    - `coupling`: λ, with 0 < λ <= 1 (default 0.999, as McCallum & Foster use). For
        the test equation y' = μy, one step multiplies (y, z) by a matrix with
        determinant λ whose eigenvalues are, for the exact flow, e^{hμ} (the solution)
        and λ·e^{−hμ} (a parasitic mode, excited at the size of the local error). With
        λ < 1 the parasitic mode is damped where Re(hμ) > ln λ, so the scheme is
        linearly stable in a region of nonzero width (λ = 1, as in reversible Heun
        and the asynchronous leapfrog, leaves only the imaginary axis); over an
        interval of length T it grows by at most λ^n·e^{|Re μ|T}. Undoing a step
        multiplies the parasitic mode by e^{hμ}/λ, so rounding errors in the
        reconstructed trajectory grow by up to λ^{−n} over n steps. λ just below 1
        keeps the reconstruction, and so the gradient, exact to rounding for
        thousands of steps (λ^{−n} = e^{n/1000} for the default: 2.7 at n = 1000)
        while keeping that stable region; smaller λ widens the region
        (`Re(hμ) > ln λ`) at an exponential cost in reconstruction error
        (`benchmarks/reversible.py` measures the reconstruction error by n and λ).

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

    solver: diffrax.AbstractSolver
    coupling: float = eqx.field(default=DEFAULT_COUPLING, static=True)

    def __check_init__(self):
        if explicit_tableau(self.solver) is None:
            raise ValueError(
                "Reversible: `solver` must be an explicit Runge--Kutta solver "
                "(diffrax.Euler, Heun, Midpoint, Ralston, Bosh3, Tsit5, Dopri5, "
                "Dopri8, or a diffrax.AbstractERK with a ButcherTableau that keeps "
                f"Diffrax's own `init`, `func` and `step`), got "
                f"{type(self.solver).__name__}."
            )
        check_coupling("Reversible", self.coupling)

    @property
    def base_tableau(self) -> ExplicitTableau:
        """The wrapped solver's tableau."""
        tableau = explicit_tableau(self.solver)
        assert tableau is not None  # checked at construction
        return tableau

    @property
    def term_structure(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.term_structure

    @property
    def interpolation_cls(self):  # pyright: ignore[reportIncompatibleMethodOverride]
        return _Interpolation(self.solver.interpolation_cls)

    def order(self, terms):
        return self.solver.order(terms)

    def strong_order(self, terms):
        return self.solver.strong_order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)

    def init(self, terms, t0, t1, y0, args):
        del terms, t0, t1, args
        return y0  # z_0 = y_0

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        # After a jump in y (a `jump_ts`, or the cotangent added between the
        # segments of a backsolve) the pair restarts: z_n = y_n. Each step of the
        # wrapped solver starts afresh anyway.
        z0 = jtu.tree_map(lambda y, z: jnp.where(made_jump, y, z), y0, solver_state)
        z_step, y_error, base_info, result_1 = self._base_step(terms, t0, t1, z0, args)
        y1 = jtu.tree_map(lambda y, z, zs: self.coupling * (y - z) + zs, y0, z0, z_step)
        y_back, _, _, result_2 = self._base_step(terms, t1, t0, y1, args)
        z1 = jtu.tree_map(lambda z, yb, y: z - (yb - y), z0, y_back, y1)
        result = diffrax.RESULTS.where(
            result_1 == diffrax.RESULTS.successful, result_2, result_1
        )
        return y1, y_error, dict(y0=y0, y1=y1, base=base_info), z1, result

    def _base_step(self, terms, t0, t1, y0, args):
        state = self.solver.init(terms, t0, t1, y0, args)
        y1, y_error, info, _, result = self.solver.step(
            terms, t0, t1, y0, args, state, True
        )
        return y1, y_error, info, result

    def backward_step(self, terms, t0, t1, y1, z1, args) -> tuple[Any, Any]:
        """The start `(y0, z0)` of the step from `t0` to `t1` that ended at
        `(y1, z1)`, in closed form (the step's two stages of the wrapped solver
        recomputed; nothing stored)."""
        vf_prod = lambda t, y, t_start, t_end: terms.vf_prod(
            t, y, args, terms.contr(t_start, t_end)
        )
        z0, _ = z_before(self.base_tableau, vf_prod, t0, t1, y1, z1)
        y0, _ = y_before(
            self.base_tableau, self.coupling, vf_prod, t0, t1, y1, z0, num_stages=None
        )
        return y0, z0

    def dense_info(self, y0, y1, stages) -> dict:
        """A step's dense output (as `step` gives it) from its ends and
        `stages = (z0, ks)`: z_n and the stages of the forward step from it."""
        z0, ks = stages
        z_step = step_end(self.base_tableau, z0, ks)
        return dict(y0=y0, y1=y1, base=rk_dense_info(self.solver, z0, z_step, ks))


def z_before(tableau: ExplicitTableau, vf_prod: Callable, t0, t1, y1, z1):
    """z_n = z_{n+1} + Ψ_{−h}(t_{n+1}, y_{n+1}), and the stages of that step of the
    wrapped solver from y_{n+1} back to t_n. `vf_prod(t, y, t_start, t_end)` is the
    vector field-control product of a step from `t_start` to `t_end`."""
    ks = recompute_stages(
        tableau,
        tableau.stages_for_solution(),
        lambda t, y: vf_prod(t, y, t1, t0),
        t1,
        t0,
        y1,
    )
    y_back = step_end(tableau, y1, ks)
    # As `Reversible.step` computed z_{n+1}, undone.
    return jtu.tree_map(lambda z, yb, y: z + (yb - y), z1, y_back, y1), ks


def y_before(
    tableau: ExplicitTableau,
    coupling: float,
    vf_prod: Callable,
    t0,
    t1,
    y1,
    z0,
    *,
    num_stages: int | None,
    num_computed=None,
):
    """y_n = (y_{n+1} − z_n − Ψ_h(t_n, z_n)) / λ + z_n, and the stages of the step
    of the wrapped solver from z_n: `num_stages` of them (default: all), of which the
    first `num_computed` (default: all; may be traced) are evaluated."""
    if num_stages is None:
        num_stages = tableau.num_stages
    ks = recompute_stages(
        tableau,
        num_stages,
        lambda t, y: vf_prod(t, y, t0, t1),
        t0,
        t1,
        z0,
        num_computed=num_computed,
    )
    z_step = step_end(tableau, z0, ks)
    y0 = jtu.tree_map(lambda y, zs, z: (y - zs) / coupling + z, y1, z_step, z0)
    return y0, ks


class _Interpolation(eqx.Module):
    """`Reversible.interpolation_cls`: builds a step's `ReversibleInterpolation`
    from its dense output, with the wrapped solver's interpolation."""

    base_cls: Callable = eqx.field(static=True)

    def __call__(self, *, t0, t1, y0, y1, base):
        return ReversibleInterpolation(
            t0=t0,
            t1=t1,
            y0=y0,
            y1=y1,
            base=self.base_cls(t0=t0, t1=t1, **base),
            base_y0=base["y0"],
            base_y1=base["y1"],
        )


class ReversibleInterpolation(diffrax.AbstractLocalInterpolation):
    """y(t_n + θh) = B(t) + (1 − θ)(y_n − z_n) + θ(y_{n+1} − B(t_{n+1})): the
    wrapped solver's interpolation B of the forward step from z_n, shifted linearly
    to meet y_n at θ = 0 and y_{n+1} at θ = 1. (For Euler, the straight line
    between y_n and y_{n+1}.)"""

    t0: Any
    t1: Any
    y0: Any
    y1: Any
    base: diffrax.AbstractLocalInterpolation
    base_y0: Any
    base_y1: Any

    def evaluate(self, t0, t1=None, left: bool = True):
        if t1 is not None:
            return jtu.tree_map(
                jnp.subtract, self.evaluate(t1, left=left), self.evaluate(t0, left=left)
            )
        width = self.t1 - self.t0
        theta = jnp.where(
            width == 0, 0, (t0 - self.t0) / jnp.where(width == 0, 1, width)
        )

        def shifted(b, y0, y1, b0, b1):
            theta_ = theta.astype(b.dtype)
            return b + (1 - theta_) * (y0 - b0) + theta_ * (y1 - b1)

        return jtu.tree_map(
            shifted,
            self.base.evaluate(t0, left=left),
            self.y0,
            self.y1,
            self.base_y0,
            self.base_y1,
        )
