"""`continuous` (the continuous adjoint) is approximate: its error falls by orders of
magnitude as the tolerances of both solves tighten."""

import diffrax
import equinox as eqx
import jax.numpy as jnp
from helpers import scalar_loss, small_problem

import neuralode
import neuralode.measure


def _grad(inp, adjoint, solver, tol):
    def loss(inp):
        y0, args, field = inp
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, a: a * field(t, y)),
            solver,
            0.0,
            2.0,
            None,
            y0,
            args=args,
            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
            adjoint=adjoint,
            max_steps=4096,
        )
        return scalar_loss(sol.ys)

    return eqx.filter_jit(eqx.filter_grad(loss))(inp)


def test_continuous_converges_to_the_exact_gradient(getkey):
    y0, _, field = small_problem(getkey())
    inp = (y0, jnp.array(3.0), field)  # fast enough dynamics for many steps
    exact = _grad(inp, diffrax.RecursiveCheckpointAdjoint(), diffrax.Dopri8(), 1e-12)
    errors = []
    for tol in (1e-3, 1e-6, 1e-9):
        adjoint = neuralode.get_adjoint("continuous", rtol=tol, atol=tol, seminorm=True)
        errors.append(
            neuralode.measure.relative_error(
                _grad(inp, adjoint, diffrax.Dopri5(), tol), exact
            )
        )
    assert errors[0] > 10 * errors[1] > 100 * errors[2], errors
    assert errors[2] < 1e-6, errors
