"""`symplectic` and `backprop` against `diffrax.RecursiveCheckpointAdjoint` on the same
call: same solution, same gradients (w.r.t. y0, args and the field's parameters) to
1e-12 relative in float64. `SymplecticAdjoint()` keeps Diffrax's default number of
checkpoints (10 for the `max_steps=64` used here), so most solves below recompute steps
from checkpoints; some compare fewer checkpoints and every step kept too."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
import pytest
from helpers import RK4, assert_tree_allclose, scalar_loss, small_problem, solve

import neuralode

RTOL = 1e-12
STRATEGIES = (neuralode.SymplecticAdjoint(), neuralode.BackpropAdjoint())
# Fewer checkpoints than steps, and every step kept.
SCHEDULES = (
    neuralode.SymplecticAdjoint(checkpoints=2),
    neuralode.SymplecticAdjoint(checkpoints="all"),
)
SAVE_TS = jnp.array([0.0, 0.13, 0.5, 0.77, 1.0])  # not step endpoints
CONSTANT = diffrax.ConstantStepSize()
PID = diffrax.PIDController(rtol=1e-4, atol=1e-6)
PID_TIGHT = diffrax.PIDController(rtol=1e-9, atol=1e-9)


def _compare(inp, strategies=STRATEGIES, solve=solve, **solve_kwargs):
    """Solutions and gradients of `strategies` and of the reference, in one compile."""

    def loss(inp, adjoint):
        ys = solve(inp, adjoint=adjoint, **solve_kwargs).ys
        return scalar_loss(ys), ys

    @eqx.filter_jit
    def run(inp):
        return [
            eqx.filter_grad(loss, has_aux=True)(inp, adjoint)
            for adjoint in (diffrax.RecursiveCheckpointAdjoint(), *strategies)
        ]

    (ref_grad, ref_ys), *results = run(inp)
    for grad, ys in results:
        assert_tree_allclose(ys, ref_ys, RTOL)
        assert_tree_allclose(grad, ref_grad, RTOL)
    return ref_grad


@pytest.mark.parametrize(
    "solver",
    [
        diffrax.Euler(),
        diffrax.Heun(),
        diffrax.Midpoint(),
        diffrax.Ralston(),
        diffrax.Bosh3(),
        diffrax.Tsit5(),
        diffrax.Dopri5(),
        diffrax.Dopri8(),
        RK4(),
    ],
    ids=lambda s: type(s).__name__,
)
def test_every_explicit_solver(solver, getkey):
    # Adaptive where the solver has an error estimate; saves inside steps.
    adaptive = type(solver) not in (diffrax.Euler, RK4)
    controller = PID if adaptive else CONSTANT
    grad = _compare(
        small_problem(getkey()),
        solver=solver,
        controller=controller,
        saveat=diffrax.SaveAt(ts=SAVE_TS),
    )
    y0_grad, args_grad, field_grad = grad
    assert jnp.all(y0_grad != 0) and args_grad != 0  # all three inputs get gradients
    assert any(jnp.any(g != 0) for g in jax.tree_util.tree_leaves(field_grad))


# PID with SaveAt(ts) is covered by test_every_explicit_solver.
@pytest.mark.parametrize(
    "controller, saveat",
    [
        (CONSTANT, diffrax.SaveAt(t0=True, t1=True)),
        (CONSTANT, diffrax.SaveAt(ts=SAVE_TS)),
        (PID, diffrax.SaveAt(t0=True, t1=True)),
        # What the refusal of jump_ts points to: steps that end exactly at given times.
        (
            diffrax.ClipStepSizeController(PID, step_ts=SAVE_TS[1:-1]),
            diffrax.SaveAt(ts=SAVE_TS),
        ),
    ],
    ids=[
        "constant-t0-t1",
        "constant-ts",
        "pid-t0-t1",
        "pid-step-ts",
    ],
)
def test_saveat_and_controllers(saveat, controller, getkey):
    # Dopri5 has b_2 = 0 and an FSAL stage: both special cases of the stage pullback.
    _compare(
        small_problem(getkey()),
        solver=diffrax.Dopri5(),
        controller=controller,
        saveat=saveat,
    )


def solve_forced(inp, **kwargs):
    """`solve` with a forcing that makes adaptive steps vary and get rejected: tens of
    steps, several rejected, at PID(1e-6)."""
    y0, args, field = inp
    forced = lambda t, y: field(t, y) + 4.0 * jnp.sin(40.0 * t) * y
    return solve((y0, args, forced), **kwargs)


@pytest.mark.parametrize(
    "solver, controller",
    [
        (diffrax.Tsit5(), diffrax.PIDController(rtol=1e-6, atol=1e-6)),
        (diffrax.Dopri5(), diffrax.PIDController(rtol=1e-6, atol=1e-6)),
        (diffrax.Dopri8(), diffrax.PIDController(rtol=1e-6, atol=1e-6)),
        (RK4(), CONSTANT),
    ],
    ids=["tsit5-pid", "dopri5-pid", "dopri8-pid", "user-tableau-constant"],
)
def test_checkpoints_recompute_the_steps_taken(solver, controller, getkey):
    # 1, 2 and 5 checkpoints for tens of steps (every step kept: the other tests):
    # each recomputed step, rejected attempts included, is the step the solve took.
    inp = small_problem(getkey())
    adjoints = [neuralode.SymplecticAdjoint(checkpoints=c) for c in (1, 5)]
    kwargs = dict(
        solver=solver, controller=controller, saveat=diffrax.SaveAt(ts=SAVE_TS)
    )

    @eqx.filter_jit
    def stats(inp):
        sol = solve_forced(inp, adjoint=adjoints[0], **kwargs)
        return sol.stats["num_accepted_steps"], sol.stats["num_rejected_steps"]

    accepted, rejected = stats(inp)
    assert accepted >= 20, accepted
    assert isinstance(controller, diffrax.ConstantStepSize) or rejected >= 5, rejected
    _compare(inp, strategies=(*adjoints, SCHEDULES[0]), solve=solve_forced, **kwargs)


def test_jump_ts_where_the_field_jumps(getkey):
    # With jump_ts a step ends just before a jump and the next starts just after it,
    # and the loop records the latter time as the end of both. The field changes sign
    # at the jumps (one of them a save time), so a step recomputed across its jump
    # would be wrong by O(1).
    jumps = jnp.array([0.5, 0.6])

    def solve_with_jumps(inp, *, adjoint, **kwargs):
        y0, args, field = inp
        sign = lambda t: jnp.where((t < jumps[0]) | (t > jumps[1]), 1.0, -1.0)
        switching = lambda t, y: sign(t) * field(t, y)
        return solve((y0, args, switching), adjoint=adjoint, **kwargs)

    _compare(
        small_problem(getkey()),
        solve=solve_with_jumps,
        solver=diffrax.Tsit5(),
        controller=diffrax.ClipStepSizeController(PID, jump_ts=jumps),
        saveat=diffrax.SaveAt(ts=SAVE_TS),
    )


def test_saveat_steps_fn_and_subs(getkey):
    # Every kind of output at once: saves at ts through a `fn` that closes over a
    # parameter, every second step and t1 (not itself a step save), t0 and every step,
    # and dense output evaluated between steps.
    y0, args, field = small_problem(getkey())
    weight = jax.random.normal(getkey(), (3, 2))

    def solve_with_outputs(inp, *, adjoint, **kwargs):
        y0, args, (field, weight) = inp
        project = lambda t, y, a: jnp.tanh(y @ weight) * (1 + t) * a
        saveat = diffrax.SaveAt(
            subs=(
                diffrax.SubSaveAt(ts=SAVE_TS, fn=project),
                diffrax.SubSaveAt(steps=2, t1=True),
                [diffrax.SubSaveAt(t0=True, steps=True)],
            ),
            dense=True,
        )
        sol = solve((y0, args, field), adjoint=adjoint, saveat=saveat, **kwargs)
        # Unused step slots hold inf.
        finite = jtu.tree_map(lambda y: jnp.where(jnp.isfinite(y), y, 0.0), sol.ys)
        dense = jax.vmap(sol.evaluate)(jnp.array([0.05, 0.41, 0.93]))
        return eqx.tree_at(lambda s: s.ys, sol, (finite, dense))

    grad = _compare(
        (y0, args, (field, weight)),
        strategies=(
            *STRATEGIES,
            SCHEDULES[1],
            neuralode.SymplecticAdjoint(checkpoints="all", step_activations=True),
        ),
        solve=solve_with_outputs,
        solver=diffrax.Tsit5(),
        controller=PID,
    )
    assert jnp.all(grad[2][1] != 0)  # the parameter of `fn` gets its gradient


@pytest.mark.parametrize("stopped_by", ["max_steps", "event", "event-root"])
def test_solve_stopped_early(stopped_by, getkey):
    # A solve that runs out of steps (with throw=False) or whose event triggers saves
    # only the ts it reached, then y at the time reached in the t1 slot right after.
    y0, args, field = small_problem(getkey())
    weights = jnp.arange(1.0, 6.0)[:, None]  # tells the slots apart
    solver = diffrax.Tsit5() if stopped_by == "event-root" else diffrax.Euler()

    def loss(inp, adjoint):
        y0, args, field = inp
        # The conditions close over a differentiated input.
        if stopped_by == "event":
            # Triggers at the end of the step where t * args crosses 0.3 (t = 0.5).
            stop = dict(event=diffrax.Event(lambda t, y, a, **kw: t * args - 0.3))
        elif stopped_by == "event-root":
            # Stops where the condition is zero inside a step (t* near 0.36), found
            # on the step's interpolation; t* depends on y and args.
            # (Diffrax passes `args` by name, so the closure reads it from `inp`.)
            condition = lambda t, y, args, **kw: t * inp[1] - 0.3 + 0.1 * y[0]
            root_finder = optx.Newton(rtol=1e-10, atol=1e-10)
            stop = dict(event=diffrax.Event(condition, root_finder))
        else:
            stop = dict(max_steps=4, throw=False)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, a: a * field(t, y)),
            solver,
            0.0,
            1.0,
            0.1,
            y0,
            args=args,
            saveat=diffrax.SaveAt(ts=jnp.array([0.05, 0.25, 0.5, 0.9]), t1=True),
            adjoint=adjoint,
            **{"max_steps": 64, **stop},
        )
        ys = jnp.where(jnp.isfinite(sol.ys), sol.ys, 0.0)
        # The event time t* is saved in `sol.ts`, and differentiable.
        ts = jnp.where(jnp.isfinite(sol.ts), sol.ts, 0.0)
        return scalar_loss(weights * ys) + jnp.sum(ts**2), (sol.result, sol.ts)

    @eqx.filter_jit
    def run(inp):
        return [
            eqx.filter_grad(loss, has_aux=True)(inp, adjoint)
            for adjoint in (
                diffrax.RecursiveCheckpointAdjoint(),
                *STRATEGIES,
                *SCHEDULES,
            )
        ]

    (ref_grad, (result, ts)), *results = run((y0, args, field))
    if stopped_by == "event":
        assert result == diffrax.RESULTS.event_occurred
        assert jnp.allclose(ts[3], 0.5) and not jnp.isfinite(ts[4])  # t1 slot: 3
    elif stopped_by == "event-root":
        assert result == diffrax.RESULTS.event_occurred
        assert 0.25 < ts[2] < 0.5 and not jnp.isfinite(ts[3])  # t1 slot: 2
        assert abs(10 * ts[2] - jnp.round(10 * ts[2])) > 1e-3  # not a step end
    else:
        assert result == diffrax.RESULTS.max_steps_reached
    for grad, _ in results:
        assert_tree_allclose(grad, ref_grad, RTOL)


def test_backwards_in_time(getkey):
    _compare(
        small_problem(getkey()),
        strategies=(
            *STRATEGIES,
            SCHEDULES[0],
            neuralode.SymplecticAdjoint(checkpoints=2, step_activations=True),
        ),
        solver=diffrax.Tsit5(),
        controller=PID_TIGHT,
        saveat=diffrax.SaveAt(t0=True, ts=SAVE_TS[::-1]),
        t0=1.0,
        t1=0.0,
    )


def test_vmap_over_members_with_different_step_counts(getkey):
    y0, _, field = small_problem(getkey())
    y0s = jnp.stack([y0, 2 * y0, -3 * y0])
    argss = jnp.array([0.5, 5.0, 20.0])  # faster dynamics need more steps
    kwargs = dict(
        solver=diffrax.Tsit5(),
        controller=diffrax.PIDController(rtol=1e-5, atol=1e-7),
        saveat=diffrax.SaveAt(ts=SAVE_TS),
    )

    def loss(y0s, field, adjoint):
        sols = jax.vmap(lambda y, a: solve((y, a, field), adjoint=adjoint, **kwargs))(
            y0s, argss
        )
        return scalar_loss(sols.ys), sols.stats["num_accepted_steps"]

    @eqx.filter_jit
    def run(y0s, field):
        return [
            eqx.filter_grad(loss, has_aux=True)(y0s, field, adjoint)
            for adjoint in (
                diffrax.RecursiveCheckpointAdjoint(),
                *STRATEGIES,
                *SCHEDULES,
            )
        ]

    (ref_grad, steps), *results = run(y0s, field)
    assert len(set(steps.tolist())) > 1, f"members took the same steps: {steps}"
    for grad, _ in results:
        assert_tree_allclose(grad, ref_grad, RTOL)


def test_sde_and_cde_with_fixed_paths(getkey):
    # An explicit RK solver over fixed control paths (a Brownian path; a neural CDE's
    # interpolated data, whose coefficients get gradients) is one more explicit RK solve.
    y0, args, field = small_problem(getkey())
    path = diffrax.VirtualBrownianTree(0.0, 1.0, tol=1e-3, shape=(3,), key=getkey())
    data_ts = jnp.linspace(0.0, 1.0, 6)
    data = jnp.stack([jnp.sin(3 * data_ts), jnp.cos(data_ts), data_ts**2], axis=-1)
    coeffs = diffrax.backward_hermite_coefficients(data_ts, data)

    def loss(inp, adjoint):
        y0, args, field, coeffs = inp
        control = diffrax.CubicInterpolation(data_ts, coeffs)
        diagonal = lambda f: lambda t, y, a: lx.DiagonalLinearOperator(f(a, y))
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda t, y, a: field(t, y)),
            diffrax.ControlTerm(diagonal(lambda a, y: a * jnp.tanh(y)), path),
            diffrax.ControlTerm(diagonal(lambda a, y: jnp.cos(a * y)), control),
        )
        sol = diffrax.diffeqsolve(
            terms,
            diffrax.Heun(),
            0.0,
            1.0,
            0.05,
            y0,
            args=args,
            saveat=diffrax.SaveAt(ts=SAVE_TS),
            adjoint=adjoint,
            max_steps=32,
        )
        return scalar_loss(sol.ys)

    @eqx.filter_jit
    def run(inp):
        return [
            eqx.filter_grad(loss)(inp, adjoint)
            for adjoint in (diffrax.RecursiveCheckpointAdjoint(), *STRATEGIES)
        ]

    ref_grad, *results = run((y0, args, field, coeffs))
    assert all(jnp.any(c != 0) for c in ref_grad[3])  # the data gets a gradient
    for grad in results:
        assert_tree_allclose(grad, ref_grad, RTOL)


def test_pytree_state(getkey):
    # A state made of several arrays, as in a continuous normalising flow's (z, log p).
    y0, args, field = small_problem(getkey())

    def loss(inp, adjoint):
        (z0, w0), args, field = inp

        def vector_field(t, y, a):
            z, w = y
            dz = a * field(t, z)
            return dz, jnp.sum(dz * z) - w

        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            diffrax.Bosh3(),
            0.0,
            1.0,
            0.05,
            (z0, w0),
            args=args,
            saveat=diffrax.SaveAt(ts=SAVE_TS),
            adjoint=adjoint,
            max_steps=32,
            stepsize_controller=PID,
        )
        return scalar_loss(sol.ys[0]) + scalar_loss(sol.ys[1])

    @eqx.filter_jit
    def run(inp):
        return [
            eqx.filter_grad(loss)(inp, adjoint)
            for adjoint in (diffrax.RecursiveCheckpointAdjoint(), *STRATEGIES)
        ]

    ref_grad, *results = run(((y0, jnp.array(0.3)), args, field))
    for grad in results:
        assert_tree_allclose(grad, ref_grad, RTOL)
