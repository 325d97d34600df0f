"""The JAX side of a configuration: its solver, parameters, loss and jitted gradient."""

import functools

import numpy as np

from reporting.problems import MATMUL_PRECISION, T1, numpy_problem
from reporting.strategies import make_adjoint


def setup_jax():
    import jax

    jax.config.update("jax_enable_x64", True)
    # float32 products in float32: on NVIDIA GPUs JAX's default is TF32, whose rounding
    # (about 1e-3) would hide every strategy's own error behind the matmul's.
    jax.config.update("jax_default_matmul_precision", MATMUL_PRECISION)
    return jax


def make_solver(name: str):
    import diffrax

    if name == "rk4":
        return _rk4()
    return {
        "heun": diffrax.Heun,
        "bosh3": diffrax.Bosh3,
        "tsit5": diffrax.Tsit5,
        "dopri5": diffrax.Dopri5,
        "dopri8": diffrax.Dopri8,
    }[name]()


@functools.cache
def _rk4():
    """torchdiffeq's fixed-grid `rk4`: the fourth-order 3/8 rule (its
    `rk4_alt_step_func`), so that both sides take the very same steps. Constant steps
    only (no error estimate)."""
    import diffrax

    class RK4(diffrax.AbstractERK):
        tableau = diffrax.ButcherTableau(
            c=np.array([1 / 3, 2 / 3, 1.0]),
            b_sol=np.array([1 / 8, 3 / 8, 3 / 8, 1 / 8]),
            b_error=np.zeros(4),
            a_lower=(
                np.array([1 / 3]),
                np.array([-1 / 3, 1.0]),
                np.array([1.0, -1.0, 1.0]),
            ),
        )
        interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

        def order(self, terms):
            return 4

    return RK4()


def stages(name: str) -> int:
    """Stages s of the solver's Butcher tableau (evaluations of f per step, FSAL
    included)."""
    return len(make_solver(name).tableau.c) + 1


def jax_problem(c: dict, dtype: str | None = None):
    """(params, static, y0) of configuration `c` as JAX arrays of `dtype`."""
    jax = setup_jax()
    import equinox as eqx
    import jax.numpy as jnp

    import neuralode

    dtype = jnp.dtype(dtype or c["dtype"])
    layers, y0 = numpy_problem(c)
    field = neuralode.MLPField(
        c["state_dim"], c["width"], c["depth"], key=jax.random.PRNGKey(0)
    )
    for i, (w, b) in enumerate(layers):
        field = eqx.tree_at(
            lambda f, i=i: (f.mlp.layers[i].weight, f.mlp.layers[i].bias),
            field,
            (jnp.asarray(w, dtype), jnp.asarray(b, dtype)),
        )
    params, static = eqx.partition(field, eqx.is_array)
    return params, static, jnp.asarray(y0, dtype)


def loss_fn(strategy, solver, n, static, dtype, *, counter=None, tol=None, **options):
    """loss(params, y0, value) = ½·mean(y(t1)²) of the configured solve. With `tol`,
    adaptive steps (PID, rtol = atol = value) from dt0 chosen by Diffrax, at most
    `max_steps`; otherwise constant steps of dt0 = value (default t1/n), at most n of
    them. `counter`: an `EvaluationCounter` that counts the evaluations of f. Options:
    `max_steps`, `throw`, `t1`."""
    import diffrax
    import equinox as eqx
    import jax.numpy as jnp

    t1 = options.get("t1", T1)

    def loss(params, y0, value=None):
        field = eqx.combine(params, static)
        if counter is not None:
            field = counter.wrap(field)
        if tol is None:
            controller, steps = diffrax.ConstantStepSize(), n
            dt0 = jnp.asarray(t1 / n, dtype) if value is None else value
            adjoint = make_adjoint(strategy, n)
        else:
            controller = diffrax.PIDController(rtol=value, atol=value)
            dt0, steps = None, options["max_steps"]
            adjoint = make_adjoint(strategy, steps, tol=value)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            make_solver(solver),
            jnp.asarray(0.0, dtype),
            jnp.asarray(t1, dtype),
            dt0,
            y0,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=steps,
            throw=options.get("throw", tol is None),
        )
        return 0.5 * jnp.mean(sol.ys[-1] ** 2)

    return loss


def config_loss(c: dict, static, strategy=None, counter=None):
    """loss(params, y0) of configuration `c`, with `strategy` in place of its own if
    given: n constant steps, or adaptive steps at `c["tol"]` (at most n)."""
    import jax.numpy as jnp

    strategy, dtype = strategy or c["strategy"], c["dtype"]
    n, tol = c["n_steps"], c.get("tol")
    if tol is None:
        return loss_fn(strategy, c["solver"], n, static, dtype, counter=counter)
    adaptive = loss_fn(
        strategy,
        c["solver"],
        None,
        static,
        dtype,
        counter=counter,
        tol=True,
        max_steps=n,
    )
    return lambda params, y0: adaptive(params, y0, jnp.asarray(tol, dtype))


def under_precision(fn, precision=None):
    """`fn` traced under the matmul `precision` (default: the report's)."""
    jax = setup_jax()

    def traced(*args):
        with jax.default_matmul_precision(precision or MATMUL_PRECISION):
            return fn(*args)

    return traced


def grad_fn(loss, precision=None):
    """The jitted gradient of `loss` with respect to its first two arguments, traced
    under the matmul `precision`, backward pass included (a custom VJP's backward is
    traced outside `loss`)."""
    jax = setup_jax()
    return jax.jit(under_precision(jax.grad(loss, argnums=(0, 1)), precision))


def config_gradient(c: dict):
    """(jitted gradient, params, y0) of configuration `c`'s loss."""
    params, static, y0 = jax_problem(c)
    return grad_fn(config_loss(c, static), c.get("precision")), params, y0


def config_forward(c: dict):
    """The jitted forward solve (loss without a gradient) of `c`'s problem."""
    jax = setup_jax()
    params, static, y0 = jax_problem(c)
    loss = config_loss(c, static, "diffrax_rca")
    return jax.jit(under_precision(loss, c.get("precision"))), params, y0


def flat_grads(grads) -> list[np.ndarray]:
    """Gradient leaves as float64 NumPy arrays in the order [W1, b1, ..., y0]."""
    jax = setup_jax()
    return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(grads)]
