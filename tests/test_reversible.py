"""`reversible`: `ReversibleAdjoint` on `Reversible(solver)` against
`diffrax.RecursiveCheckpointAdjoint` on the same solver (1e-10 relative in float64),
the closed-form inverse after 1000 steps, memory that does not grow with the number of
steps (XLA's static analysis), the order of convergence, and what it refuses."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    RK4,
    as_users_run_it,
    assert_tree_allclose,
    scalar_loss,
    small_problem,
    solve,
)

import neuralode
import neuralode.measure

RTOL = 1e-10
SAVE_TS = jnp.array([0.0, 0.13, 0.5, 0.77, 1.0])  # not step endpoints
CONSTANT = diffrax.ConstantStepSize()
PID = diffrax.PIDController(rtol=1e-5, atol=1e-7)
# Heun's second order takes hundreds of steps at PID's tolerances.
PID_LOOSE = diffrax.PIDController(rtol=1e-3, atol=1e-3)
# (base solver, step control, saves, backwards in time): each solver once, each
# feature in at least two cases.
CASES = {
    "euler-constant-ts": (diffrax.Euler(), CONSTANT, diffrax.SaveAt(ts=SAVE_TS), False),
    "heun-pid-ts-backwards": (
        diffrax.Heun(),
        PID_LOOSE,
        diffrax.SaveAt(t0=True, ts=SAVE_TS[::-1]),
        True,
    ),
    "tsit5-pid-ts": (diffrax.Tsit5(), PID, diffrax.SaveAt(ts=SAVE_TS), False),
    "dopri5-constant-steps-fn": (
        diffrax.Dopri5(),
        CONSTANT,
        diffrax.SaveAt(
            subs=(
                diffrax.SubSaveAt(t0=True, steps=True),
                diffrax.SubSaveAt(ts=SAVE_TS, fn=lambda t, y, a: jnp.tanh(y) * a),
            )
        ),
        False,
    ),
    "user-tableau-constant-ts-backwards": (
        RK4(),
        CONSTANT,
        diffrax.SaveAt(ts=SAVE_TS[::-1], t1=True),
        True,
    ),
}


def _loss(inp, adjoint, base, controller, saveat, backwards):
    times = dict(t0=1.0, t1=0.0) if backwards else {}
    sol = solve(
        inp,
        adjoint=adjoint,
        solver=neuralode.Reversible(base),
        controller=controller,
        saveat=saveat,
        **times,
    )
    ys = jax.tree_util.tree_map(lambda y: jnp.where(jnp.isfinite(y), y, 0.0), sol.ys)
    return scalar_loss(ys), (ys, sol.stats["num_accepted_steps"])


@pytest.mark.parametrize("case", CASES)
def test_equals_recursive_checkpointing_on_the_same_solver(case, getkey):
    # Under vmap over three members whose dynamics differ in speed, so that adaptive
    # solves take different numbers of steps: one compile per case.
    base, controller, saveat, backwards = CASES[case]
    y0, _, field = small_problem(getkey())
    y0s = jnp.stack([y0, 2 * y0, -3 * y0])
    argss = jnp.array([0.5, 3.0, 8.0])

    def batch_loss(inputs, adjoint):
        y0s, field = inputs
        losses, (ys, steps) = jax.vmap(
            lambda y, a: _loss((y, a, field), adjoint, *CASES[case])
        )(y0s, argss)
        return jnp.sum(losses), (ys, steps)

    @eqx.filter_jit
    def run(y0s, field):
        return [
            eqx.filter_grad(batch_loss, has_aux=True)((y0s, field), adjoint)
            for adjoint in (
                diffrax.RecursiveCheckpointAdjoint(),
                neuralode.ReversibleAdjoint(),
            )
        ]

    (ref_grad, (ref_ys, steps)), (grad, (ys, _)) = run(y0s, field)
    assert_tree_allclose(ys, ref_ys, RTOL)
    assert_tree_allclose(grad, ref_grad, RTOL)
    y0s_grad, field_grad = grad
    assert jnp.all(y0s_grad != 0)
    assert all(jnp.any(g != 0) for g in jax.tree_util.tree_leaves(field_grad))
    if isinstance(controller, diffrax.PIDController):
        assert len(set(steps.tolist())) > 1, f"members took the same steps: {steps}"


def test_works_under_the_continuous_adjoint(getkey):
    # A Diffrax solver like any other: the continuous adjoint, which solves backwards
    # between the save times and restarts the pair (z = y) where it adds their
    # cotangents, approximates the exact gradient.
    inp = small_problem(getkey())
    saveat = diffrax.SaveAt(ts=SAVE_TS)

    @eqx.filter_jit
    def run(inp):
        return [
            eqx.filter_grad(_loss, has_aux=True)(
                inp, adjoint, diffrax.Heun(), CONSTANT, saveat, False
            )[0]
            for adjoint in (
                neuralode.ReversibleAdjoint(),
                neuralode.ContinuousAdjoint(),
            )
        ]

    exact, continuous = run(inp)
    assert neuralode.measure.relative_error(continuous, exact) < 1e-4


def _linear(matrix):
    return diffrax.ODETerm(lambda t, y, args: matrix @ y)


DAMPED = jnp.array([[-0.5, 1.0], [-1.0, -0.5]])  # a decaying spiral
OSCILLATING = jnp.array([[0.0, 1.0], [-1.0, 0.0]])  # a harmonic oscillator


@jax.jit
def _forward_then_back(matrix, y0):
    """1000 Tsit5 steps of y' = matrix·y over [0, 10], then undone one by one from the
    end: (steps taken, y_n, the reconstructed y_0 and z_0)."""
    solver = neuralode.Reversible(diffrax.Tsit5())
    term = diffrax.ODETerm(lambda t, y, matrix: matrix @ y)
    n = 1000
    sol = diffrax.diffeqsolve(
        term,
        solver,
        0.0,
        10.0,
        10.0 / n,
        y0,
        args=matrix,
        saveat=diffrax.SaveAt(t0=True, steps=True, solver_state=True),
        max_steps=n,
    )
    ts = sol.ts

    def undo(i, state):
        k = n - i  # step k - 1 ran from ts[k - 1] to ts[k]
        return solver.backward_step(term, ts[k - 1], ts[k], *state, matrix)

    y_start, z_start = jax.lax.fori_loop(0, n, undo, (sol.ys[-1], sol.solver_state))
    return sol.stats["num_accepted_steps"], sol.ys[-1], y_start, z_start


@pytest.mark.parametrize("matrix", [DAMPED, OSCILLATING], ids=["damped", "oscillating"])
def test_1000_steps_undone_in_closed_form(matrix):
    # y_0 comes back to 1e-10 (the parasitic mode grows by at most λ^{-n} = e).
    y0 = jnp.array([1.0, 0.5])
    steps, y_end, y_start, z_start = _forward_then_back(matrix, y0)
    assert int(steps) == 1000
    exact_end = jax.scipy.linalg.expm(10.0 * matrix) @ y0
    assert jnp.max(jnp.abs(y_end - exact_end)) < 1e-6  # a solve, not a blow-up
    assert jnp.max(jnp.abs(y_start - y0)) <= 1e-10 * jnp.max(jnp.abs(y0))
    assert jnp.max(jnp.abs(z_start - y0)) <= 1e-10 * jnp.max(jnp.abs(y0))


def test_memory_does_not_grow_with_steps():
    # XLA's temp bytes of the gradient, constant steps, a batch of 256 states of 32 under
    # an MLP field: n = 1024 steps within 10% of n = 64 (the steps' intervals, 2·n
    # scalars, are all that grows).
    field = neuralode.MLPField(32, 64, 2, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(field, eqx.is_array)
    y0 = jnp.full((256, 32), 0.1)

    def temp_bytes(n):
        def grad(params, y0):
            def loss(params, y0):
                sol = diffrax.diffeqsolve(
                    diffrax.ODETerm(eqx.combine(params, static)),
                    neuralode.Reversible(diffrax.Tsit5()),
                    0.0,
                    1.0,
                    1.0 / n,
                    y0,
                    adjoint=neuralode.ReversibleAdjoint(),
                    max_steps=n,
                )
                return jnp.sum(sol.ys**2)

            return jax.grad(loss, argnums=(0, 1))(params, y0)

        return neuralode.measure.xla_temp_bytes(grad, params, y0)

    small, large = temp_bytes(64), temp_bytes(1024)
    assert large <= 1.1 * small, (small, large)


@pytest.mark.parametrize(
    "base",
    [diffrax.Euler(), diffrax.Heun(), diffrax.Tsit5()],
    ids=lambda s: type(s).__name__,
)
def test_converges_at_the_base_order(base):
    # On y' = A y over [0, 1] the error at t1 falls with h as the wrapped solver's
    # does: the fitted order is at least the solver's and within 0.3 of the order the
    # solver itself shows here (Tsit5 shows more than 5 on a linear field at these h).
    matrix = jnp.array([[-0.3, 2.0], [-2.0, -0.3]])
    term = _linear(matrix)
    y0 = jnp.array([1.0, 0.0])
    exact = jax.scipy.linalg.expm(matrix) @ y0
    ns = np.array([4, 8, 16, 32])

    @eqx.filter_jit
    def error(solver, dt0):
        sol = diffrax.diffeqsolve(term, solver, 0.0, 1.0, dt0, y0, max_steps=64)
        return jnp.max(jnp.abs(sol.ys[-1] - exact))

    def fitted_order(solver):
        errors = np.array([float(error(solver, 1.0 / n)) for n in ns])
        return np.polyfit(np.log(1.0 / ns), np.log(errors), 1)[0]

    order = fitted_order(neuralode.Reversible(base))
    assert order > base.order(term) - 0.2, order
    assert abs(order - fitted_order(base)) < 0.3, (order, fitted_order(base))


def test_plain_solver_is_solved_then_refused():
    # A plain solver is solved as by Diffrax's default adjoint; differentiating it raises
    # at trace time, saying how to wrap the solver.
    inp = small_problem(jax.random.PRNGKey(0))
    kwargs = dict(
        solver=diffrax.Tsit5(), controller=CONSTANT, saveat=diffrax.SaveAt(ts=SAVE_TS)
    )
    values = eqx.filter_jit(
        lambda inp: [
            solve(inp, adjoint=a, **kwargs).ys
            for a in (
                diffrax.RecursiveCheckpointAdjoint(),
                neuralode.ReversibleAdjoint(),
            )
        ]
    )(inp)
    np.testing.assert_array_equal(values[0], values[1])
    loss = lambda y0: jnp.sum(
        solve((y0, *inp[1:]), adjoint=neuralode.ReversibleAdjoint(), **kwargs).ys
    )
    with pytest.raises(
        NotImplementedError, match=r"neuralode\.Reversible\(diffrax\.Tsit5\(\)\)"
    ):
        jax.eval_shape(jax.grad(loss), inp[0])


@pytest.mark.parametrize(
    "what, solve_kwargs",
    [
        ("an event", dict(event=diffrax.Event(lambda t, y, args, **kw: t > 0.5))),
        ("dense", dict(saveat=diffrax.SaveAt(dense=True, t1=True))),
        ("max_steps", dict(max_steps=None)),
        (
            "jump_ts",
            dict(
                stepsize_controller=diffrax.PIDController(
                    rtol=1e-3, atol=1e-3, jump_ts=jnp.array([0.55])
                ),
                max_steps=256,
            ),
        ),
    ],
)
def test_what_it_cannot_differentiate_is_refused(what, solve_kwargs):
    def loss(y0):
        kwargs = dict(saveat=diffrax.SaveAt(t1=True), max_steps=16) | solve_kwargs
        sol = diffrax.diffeqsolve(
            _linear(OSCILLATING),
            neuralode.Reversible(diffrax.Heun()),
            0.0,
            1.0,
            0.1,
            y0,
            adjoint=neuralode.ReversibleAdjoint(),
            **kwargs,
        )
        return jnp.sum(sol.ys)

    y0 = jnp.array([1.0, 0.0])
    assert jnp.isfinite(loss(y0))  # solved
    with pytest.raises(NotImplementedError, match=what) as error:
        jax.eval_shape(jax.grad(loss), y0)
    assert "ReversibleAdjoint" in str(error.value)


def test_mismatched_coupling_is_refused():
    with as_users_run_it():
        with pytest.raises(ValueError, match="set λ in one place"):
            diffrax.diffeqsolve(
                _linear(OSCILLATING),
                neuralode.Reversible(diffrax.Heun(), coupling=0.5),
                0.0,
                1.0,
                0.1,
                jnp.ones(2),
                adjoint=neuralode.ReversibleAdjoint(coupling=0.9),
            )


def test_function_evaluations_match_a_counting_field():
    calls = []

    def field(t, y, args):
        jax.debug.callback(lambda: calls.append(1))
        return -y

    for base in (diffrax.Euler(), diffrax.Bosh3()):
        solver = neuralode.Reversible(base)
        calls.clear()
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field), solver, 0.0, 1.0, 0.25, jnp.ones(2)
        )
        jax.effects_barrier()
        expected = neuralode.measure.function_evaluations(
            solver, sol.stats["num_steps"]
        )
        assert len(calls) == int(expected)
