"""What an adjoint cannot differentiate exactly fails at trace time, with an error
naming it and an alternative, and only when it is differentiated: the same solve,
not differentiated, gives Diffrax's values bit for bit."""

import diffrax
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import neuralode

Y0 = jnp.array([0.5, -0.3, 0.2])
PID = diffrax.PIDController(rtol=1e-3, atol=1e-3)


def _solve(
    y0,
    *,
    solver=None,
    saveat=None,
    max_steps=16,
    terms=None,
    full_solution=False,
    **kwargs,
):
    field = neuralode.MLPField(3, 4, 1, key=jax.random.PRNGKey(0))
    terms = diffrax.ODETerm(field) if terms is None else terms
    solver = diffrax.Tsit5() if solver is None else solver
    saveat = diffrax.SaveAt(t1=True) if saveat is None else saveat
    solution = diffrax.diffeqsolve(
        terms,
        solver,
        0.0,
        1.0,
        0.1,
        y0,
        saveat=saveat,
        max_steps=max_steps,
        **{"adjoint": neuralode.SymplecticAdjoint(), **kwargs},
    )
    return solution if full_solution else solution.ys


def _unsafe_sde_terms():
    path = diffrax.UnsafeBrownianPath(shape=(3,), key=jax.random.PRNGKey(1))
    diffusion = lambda t, y, args: lx.DiagonalLinearOperator(0.1 * jnp.ones_like(y))
    return diffrax.MultiTerm(
        diffrax.ODETerm(lambda t, y, args: -y), diffrax.ControlTerm(diffusion, path)
    )


class NormalisedHeun(diffrax.Heun):
    """Heun's tableau, but a step that is no longer the plain RK step."""

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        y1, *rest = super().step(terms, t0, t1, y0, args, solver_state, made_jump)
        return (y1 / jnp.linalg.norm(y1), *rest)


def _sde_terms(diffusion_scale=0.1):
    path = diffrax.VirtualBrownianTree(
        0.0,
        1.0,
        tol=1e-3,
        shape=(3,),
        key=jax.random.PRNGKey(1),
        levy_area=diffrax.SpaceTimeLevyArea,
    )
    field = neuralode.MLPField(3, 4, 1, key=jax.random.PRNGKey(0))
    diffusion = diffusion_scale * jnp.array([1.0, 2.0, 3.0])
    return diffrax.MultiTerm(
        diffrax.ODETerm(lambda t, y, args: field(t, y)),
        # Additive noise: every stochastic solver below takes it.
        diffrax.ControlTerm(
            lambda t, y, args: lx.DiagonalLinearOperator(diffusion), path
        ),
    )


_ROOT_EVENT = diffrax.Event(
    lambda t, y, args, **kwargs: y[0] - 0.45, optx.Newton(rtol=1e-6, atol=1e-6)
)
_SDE_SOLVERS = (
    diffrax.ShARK(),
    diffrax.GeneralShARK(),
    diffrax.SRA1(),
    diffrax.SEA(),
    diffrax.SPaRK(),
    diffrax.SlowRK(),
)
# Solves that an adjoint cannot differentiate, but solves all the same.
NOT_DIFFERENTIABLE = {
    ("symplectic", "implicit-solver"): dict(
        solver=diffrax.Kvaerno5(), stepsize_controller=PID
    ),
    ("symplectic", "half-solver"): dict(
        solver=diffrax.HalfSolver(diffrax.Tsit5()), stepsize_controller=PID
    ),
    **{
        ("symplectic", type(solver).__name__): dict(solver=solver, terms=_sde_terms())
        for solver in _SDE_SOLVERS
    },
    ("symplectic", "event-root-finder-steps"): dict(
        event=_ROOT_EVENT, saveat=diffrax.SaveAt(steps=True)
    ),
    ("symplectic", "event-root-finder-dense"): dict(
        event=_ROOT_EVENT, saveat=diffrax.SaveAt(t1=True, dense=True)
    ),
    ("symplectic", "max-steps-none"): dict(max_steps=None),
    ("symplectic", "unsafe-brownian"): dict(
        solver=diffrax.Heun(), terms=_unsafe_sde_terms()
    ),
    ("symplectic", "overridden-step"): dict(solver=NormalisedHeun()),
    ("symplectic", "solver-state"): dict(
        saveat=diffrax.SaveAt(t1=True, solver_state=True)
    ),
    ("symplectic", "controller-state"): dict(
        saveat=diffrax.SaveAt(t1=True, controller_state=True)
    ),
    ("continuous", "steps"): dict(saveat=diffrax.SaveAt(steps=True)),
    ("continuous", "fn"): dict(saveat=diffrax.SaveAt(t1=True, fn=lambda t, y, a: y[0])),
    ("continuous", "subs"): dict(
        saveat=diffrax.SaveAt(
            subs=[diffrax.SubSaveAt(t0=True), diffrax.SubSaveAt(t1=True)]
        )
    ),
    ("continuous", "dense"): dict(saveat=diffrax.SaveAt(t1=True, dense=True)),
    ("continuous", "event"): dict(event=_ROOT_EVENT),
    ("continuous", "several-terms"): dict(solver=diffrax.ShARK(), terms=_sde_terms()),
    ("continuous", "ito-solver"): dict(solver=diffrax.Euler(), terms=_sde_terms()),
}


def _values(solution):
    """Everything a forward solve returns that a reader would compare."""
    return (solution.ts, solution.ys, solution.stats, solution.result._value)


@pytest.mark.parametrize(
    "adjoint, case",
    sorted(NOT_DIFFERENTIABLE),
    ids=[":".join(k) for k in sorted(NOT_DIFFERENTIABLE)],
)
def test_solved_and_refused_only_when_differentiated(adjoint, case):
    kwargs = NOT_DIFFERENTIABLE[adjoint, case]
    # Diffrax's default adjoint refuses UnsafeBrownianPath; ForwardMode solves it.
    unsafe = case == "unsafe-brownian"
    reference = (
        diffrax.ForwardMode() if unsafe else diffrax.RecursiveCheckpointAdjoint()
    )
    ours = neuralode.get_adjoint(adjoint)

    @jax.jit
    def solve_both(y0):
        return [
            _values(_solve(y0, full_solution=True, adjoint=a, **kwargs))
            for a in (reference, ours)
        ]

    expected, actual = solve_both(Y0)
    equal = jax.tree_util.tree_map(
        lambda a, b: bool(np.array_equal(a, b, equal_nan=True)), actual, expected
    )
    assert jax.tree_util.tree_all(equal), equal  # bit for bit

    def loss(y0):
        ys = _solve(y0, adjoint=ours, **kwargs)
        return sum(
            jnp.sum(jnp.where(jnp.isfinite(y), y, 0))
            for y in jax.tree_util.tree_leaves(ys)
        )

    with pytest.raises((NotImplementedError, ValueError)) as error:
        jax.eval_shape(jax.grad(loss), Y0)  # at trace time
    message = str(error.value)
    assert type(ours).__name__ in message
    # Names what to do instead.
    assert any(word in message for word in ("Use ", "max_steps=<int>")), message


def test_forward_mode_is_refused():
    # Raised by JAX when it transforms the compiled solve; the docstring names the
    # alternatives (diffrax.ForwardMode, diffrax.DirectAdjoint, BackpropAdjoint).
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.jvp(_solve, (Y0,), (jnp.ones(3),))


def test_second_derivatives_are_refused():
    grad = jax.grad(lambda y0: jnp.sum(_solve(y0)))
    for outer in (jax.jacrev, jax.hessian):
        with pytest.raises(NotImplementedError, match="BackpropAdjoint"):
            jax.eval_shape(outer(grad), Y0)


def test_accepted_inputs_trace():
    # The refusals are not over-broad: every explicit solver and SaveAt(t0, t1, ts) trace.
    for solver in (diffrax.Euler(), diffrax.Heun(), diffrax.Dopri8()):
        saveat = diffrax.SaveAt(t0=True, t1=True, ts=jnp.linspace(0.0, 1.0, 4))
        loss = lambda y0, s=solver, sa=saveat: jnp.sum(_solve(y0, solver=s, saveat=sa))
        out = jax.eval_shape(jax.grad(loss), Y0)
        assert out.shape == (3,)

    # An event condition that reads Diffrax's keyword arguments gets the solve's own.
    def condition(t, y, args, saveat, stepsize_controller, **kwargs):
        return t > saveat.subs.ts[1] + stepsize_controller.jump_ts[0]

    controller = diffrax.ClipStepSizeController(PID, jump_ts=jnp.array([0.1]))
    event_loss = lambda y0: jnp.sum(
        _solve(
            y0,
            saveat=diffrax.SaveAt(ts=jnp.array([0.25, 0.5])),
            event=diffrax.Event(condition),
            stepsize_controller=controller,
        )
    )
    assert jax.eval_shape(jax.grad(event_loss), Y0).shape == (3,)

    # Dense output alone: a SaveAt without any other save.
    def dense_loss(y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: -y),
            diffrax.Tsit5(),
            0.0,
            1.0,
            0.1,
            y0,
            saveat=diffrax.SaveAt(dense=True),
            adjoint=neuralode.SymplecticAdjoint(),
            max_steps=16,
        )
        return jnp.sum(sol.evaluate(0.55))

    assert jax.eval_shape(jax.grad(dense_loss), Y0).shape == (3,)


@pytest.mark.parametrize("adjoint", ["symplectic", "continuous"])
def test_time_gradients_are_refused_not_zero(adjoint):
    # The times are not inputs of the custom VJP: a clear error at trace time, never a
    # silent zero.
    field = neuralode.MLPField(3, 4, 1, key=jax.random.PRNGKey(0))

    def loss(time, what):
        times = dict(t0=0.0, t1=1.0, dt0=None, ts=jnp.array([0.5, 1.0]))
        times.update(step_ts=jnp.array([0.3]), jump_ts=jnp.array([0.6]))
        times[what] = time * (
            times[what] if what in ("ts", "step_ts", "jump_ts") else 1
        )
        controller = diffrax.ClipStepSizeController(
            PID, step_ts=times["step_ts"], jump_ts=times["jump_ts"]
        )
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            diffrax.Tsit5(),
            times["t0"],
            times["t1"],
            times["dt0"],
            Y0,
            saveat=diffrax.SaveAt(ts=times["ts"]),
            stepsize_controller=controller,
            max_steps=16,
            adjoint=neuralode.get_adjoint(adjoint),
        )
        return jnp.sum(sol.ys)

    for what, value, name in [
        ("t0", 0.0, "`t0`"),
        ("t1", 1.0, "`t1`"),
        ("dt0", 0.1, "`dt0`"),
        ("ts", 1.0, "save times"),
        ("step_ts", 1.0, "`step_ts`"),
        ("jump_ts", 1.0, "`jump_ts`"),
    ]:
        with pytest.raises(NotImplementedError, match=name) as error:
            jax.eval_shape(jax.grad(lambda t, w=what: loss(t, w)), value)
        assert "RecursiveCheckpointAdjoint" in str(error.value)


def test_continuous_refuses_a_control_paths_gradient():
    # diffrax.BacksolveAdjoint would return zero for a neural CDE's coefficients.
    ts = jnp.linspace(0.0, 1.0, 5)
    data = jnp.stack([ts, jnp.sin(3 * ts)], axis=-1)
    vf = lambda t, y, args: jnp.tanh(jnp.outer(y, jnp.ones(2)))

    def loss(coeffs, adjoint):
        control = diffrax.CubicInterpolation(ts, coeffs)
        term = diffrax.ControlTerm(vf, control)
        sol = diffrax.diffeqsolve(
            term, diffrax.Tsit5(), 0.0, 1.0, 0.1, Y0, adjoint=adjoint, max_steps=16
        )
        return jnp.sum(sol.ys)

    coeffs = diffrax.backward_hermite_coefficients(ts, data)
    with pytest.raises(NotImplementedError, match="control path"):
        jax.eval_shape(jax.grad(loss), coeffs, neuralode.ContinuousAdjoint())
    # The symplectic adjoint is not refused (its values: test_exactness, CDE test).
    grad = jax.eval_shape(jax.grad(loss), coeffs, neuralode.SymplecticAdjoint())
    assert jax.tree_util.tree_structure(grad) == jax.tree_util.tree_structure(coeffs)


@pytest.mark.parametrize(
    "solver, controller, terms",
    [
        (diffrax.Tsit5(), diffrax.ConstantStepSize(), None),
        # A wrapped solver, and a stochastic RK solver, with their own stage loops.
        (diffrax.HalfSolver(diffrax.Tsit5()), PID, None),
        (diffrax.ShARK(), diffrax.ConstantStepSize(), _sde_terms()),
    ],
    ids=["tsit5", "half-solver", "shark-sde"],
)
def test_backprop_is_the_forward_mode_alternative(solver, controller, terms):
    def solve(y0, adjoint):
        return jnp.sum(
            _solve(
                y0,
                solver=solver,
                terms=terms,
                stepsize_controller=controller,
                adjoint=adjoint,
            )
        )

    tangent = jnp.array([1.0, 2.0, 3.0])
    _, ours = jax.jvp(
        lambda y: solve(y, neuralode.BackpropAdjoint()), (Y0,), (tangent,)
    )
    grad = jax.grad(solve)(Y0, diffrax.RecursiveCheckpointAdjoint())
    assert jnp.allclose(ours, jnp.vdot(grad, tangent), rtol=1e-12, atol=0)
