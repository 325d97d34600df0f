"""Memory growth in the number of steps n, from XLA's static `memory_analysis()` of the
jitted gradient (deterministic: no timing, no device)."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

import neuralode
import neuralode.measure

BATCH, DIM, WIDTH, DEPTH = 32, 8, 32, 2
ITEMSIZE = 8  # float64
STATE_BYTES = BATCH * DIM * ITEMSIZE
# Hidden activations of one evaluation of f: the least a stored evaluation costs.
ACTIVATION_BYTES = BATCH * WIDTH * DEPTH * ITEMSIZE
N_SMALL, N_LARGE = 32, 64


def _temp_bytes(adjoint, n, solver=None, max_steps=None, controller=None):
    """XLA temp bytes of the gradient of an n-step solve (n steps of a constant step
    size, or what `controller` takes on [0, 1]) with room for `max_steps` (n)."""
    solver = diffrax.Tsit5() if solver is None else solver
    controller = diffrax.ConstantStepSize() if controller is None else controller
    field = neuralode.MLPField(DIM, WIDTH, DEPTH, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(field, eqx.is_array)
    y0 = jnp.full((BATCH, DIM), 0.1)

    def grad(params, y0):
        def loss(params, y0):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(eqx.combine(params, static)),
                solver,
                0.0,
                1.0,
                1.0 / n,
                y0,
                stepsize_controller=controller,
                adjoint=adjoint,
                max_steps=n if max_steps is None else max_steps,
            )
            return jnp.sum(sol.ys**2)

        return jax.grad(loss, argnums=(0, 1))(params, y0)

    return neuralode.measure.xla_temp_bytes(grad, params, y0)


def _growth_per_step(make_adjoint):
    small = _temp_bytes(make_adjoint(N_SMALL), N_SMALL)
    large = _temp_bytes(make_adjoint(N_LARGE), N_LARGE)
    return (large - small) / (N_LARGE - N_SMALL)


def test_symplectic_stores_one_state_per_step():
    growth = _growth_per_step(lambda n: neuralode.SymplecticAdjoint(checkpoints="all"))
    assert growth <= 1.3 * STATE_BYTES, growth / STATE_BYTES
    # Diffrax's own checkpoint-every-step baseline keeps y and the FSAL value.
    rca = _growth_per_step(lambda n: diffrax.RecursiveCheckpointAdjoint(checkpoints=n))
    assert rca >= 1.8 * STATE_BYTES, rca / STATE_BYTES
    assert growth < rca


def test_symplectic_keeps_one_evaluation_of_activations():
    # From 2 to 13 stages the fixed part grows by the stage buffers (a few states per
    # stage), not by a stored evaluation of f per stage.
    heun = _temp_bytes(neuralode.SymplecticAdjoint(), N_SMALL, diffrax.Heun())
    dopri8 = _temp_bytes(neuralode.SymplecticAdjoint(), N_SMALL, diffrax.Dopri8())
    extra_stages = 13 - 2
    assert dopri8 - heun <= extra_stages * 3 * STATE_BYTES, (
        dopri8 - heun
    ) / STATE_BYTES
    assert dopri8 - heun < extra_stages * ACTIVATION_BYTES


def test_checkpointed_symplectic_does_not_grow_with_max_steps():
    # An adaptive solve of a few steps with room for 256 or 16384: c checkpoints of
    # the loop's state, whatever `max_steps`, and less than Diffrax's own
    # checkpointing at the same c.
    pid = diffrax.PIDController(rtol=1e-5, atol=1e-5)
    at = lambda adjoint, max_steps: _temp_bytes(
        adjoint, 4, max_steps=max_steps, controller=pid
    )
    ours = neuralode.SymplecticAdjoint(checkpoints=4)
    small, large = at(ours, 256), at(ours, 16384)
    assert large <= 1.1 * small, (small, large)
    rca = at(diffrax.RecursiveCheckpointAdjoint(checkpoints=4), 16384)
    assert large <= rca, (large, rca)


def test_backprop_stores_every_stage_of_every_step():
    growth = _growth_per_step(lambda n: neuralode.BackpropAdjoint())
    stages = 6  # Tsit5's stages that advance the solution
    assert growth >= stages * ACTIVATION_BYTES, growth / ACTIVATION_BYTES


def test_continuous_does_not_grow_with_steps():
    growth = _growth_per_step(lambda n: neuralode.get_adjoint("continuous"))
    assert growth == 0
