import contextlib

import diffrax
import jax.numpy as jnp
import jax.tree_util as jtu
import jaxtyping
import numpy as np

import neuralode


@contextlib.contextmanager
def as_users_run_it():
    """Without the run-time type checks of jaxtyping's import hook, under which the
    suite runs: so that a test sees the library's own errors for bad input, as a user
    does."""
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


def assert_tree_allclose(actual, expected, rtol):
    """Every leaf agrees to `rtol` relative to the leaf's largest entry."""
    a_leaves, a_def = jtu.tree_flatten(actual)
    e_leaves, e_def = jtu.tree_flatten(expected)
    assert a_def == e_def, (a_def, e_def)
    for a, e in zip(a_leaves, e_leaves, strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape
        scale = max(np.max(np.abs(e)), 1e-300)
        err = np.max(np.abs(a - e)) / scale
        assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


class RK4(diffrax.AbstractERK):
    """The classical fourth-order method, as a user would define an RK solver."""

    tableau = diffrax.ButcherTableau(
        a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
        b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
        b_error=np.zeros(4),
        c=np.array([0.5, 0.5, 1.0]),
    )
    interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        return 4


def small_problem(key):
    """(y0, args, field) for a 3-dimensional time-dependent neural ODE."""
    field = neuralode.MLPField(3, 8, 1, time_dependent=True, key=key)
    return jnp.array([0.5, -0.3, 0.2]), jnp.array(0.7), field


def solve(inp, *, adjoint, solver, controller, saveat, t0=0.0, t1=1.0, max_steps=64):
    """A solve whose vector field uses y, args (a scalar) and closes over the field."""
    y0, args, field = inp
    term = diffrax.ODETerm(lambda t, y, a: a * field(t, y))
    dt0 = 0.05 if t1 > t0 else -0.05
    return diffrax.diffeqsolve(
        term,
        solver,
        t0,
        t1,
        dt0,
        y0,
        args=args,
        saveat=saveat,
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=max_steps,
    )


def scalar_loss(ys):
    """A loss of every saved value; `ys` may be a PyTree."""
    return sum(jnp.sum(y**2) + jnp.sum(jnp.sin(3 * y)) for y in jtu.tree_leaves(ys))
