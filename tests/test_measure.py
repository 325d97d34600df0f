"""`neuralode.measure`: fits, errors, counts, memory and time, each on PyTrees that hold
Equinox modules."""

import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neuralode.measure as measure


def test_fit_exponent_recovers_power_law():
    xs = np.array([16, 32, 64, 128, 256])
    assert measure.fit_exponent(xs, 3.0 * xs**1.0) == pytest.approx(1.0)
    assert measure.fit_exponent(xs, 5.0 * xs**2.5) == pytest.approx(2.5)
    assert measure.fit_exponent(xs, np.full(5, 7.0)) == pytest.approx(0.0, abs=1e-12)
    # Non-positive and missing values are dropped; one point is not a fit.
    assert measure.fit_exponent([1, 2, 4, 8], [0, 2, 4, None]) == pytest.approx(1.0)
    assert np.isnan(measure.fit_exponent([4], [2]))


def test_fit_increment_is_the_linear_slope():
    xs = np.array([16, 64, 256])
    assert measure.fit_increment(xs, 128 * xs + 1000) == pytest.approx(128.0)
    assert np.isnan(measure.fit_increment([3, 3], [1, 2]))


def test_relative_error():
    a = {"w": jnp.ones(3), "b": jnp.zeros(2)}
    b = {"w": jnp.ones(3) * 1.5, "b": jnp.zeros(2)}
    assert measure.relative_error(a, a) == 0.0
    assert measure.relative_error(b, a) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="1 arrays, `reference` 2"):
        measure.relative_error([jnp.ones(1)], [jnp.ones(1), jnp.ones(1)])


def test_relative_error_of_equinox_modules():
    # An MLP holds an activation function and sizes beside its arrays.
    mlp = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.PRNGKey(0))
    scaled = jax.tree_util.tree_map(lambda x: 1.25 * x if eqx.is_array(x) else x, mlp)
    assert measure.relative_error(scaled, mlp) == pytest.approx(0.25)


def test_evaluation_counter_counts_runtime_evaluations():
    counter = measure.EvaluationCounter()
    term = diffrax.ODETerm(counter.wrap(lambda t, y, args: -y))

    def solve(y0):
        return diffrax.diffeqsolve(
            term, diffrax.Heun(), 0.0, 1.0, 0.25, y0, max_steps=4
        ).ys

    jax.block_until_ready(jax.jit(solve)(jnp.ones(2)))
    assert counter.count == 4 * 2  # 4 steps, 2 stages each
    counter.reset()
    jax.block_until_ready(jax.jit(solve)(jnp.ones(2)))
    assert counter.count == 8


def test_xla_temp_bytes_of_a_gradient_through_an_equinox_module():
    mlp = eqx.nn.MLP(4, 4, 32, 1, key=jax.random.PRNGKey(0))

    def grad(mlp, x):
        return eqx.filter_grad(lambda mlp: jnp.sum(jax.vmap(mlp)(x) ** 2))(mlp)

    small = measure.xla_temp_bytes(grad, mlp, jnp.ones((64, 4)))
    large = measure.xla_temp_bytes(grad, mlp, jnp.ones((128, 4)))
    # The backward pass keeps at least the hidden activations (width 32, float64)
    # of every row, so the temporaries grow with the batch by at least that much.
    assert small >= 64 * 32 * 8
    assert large - small >= 64 * 32 * 8


def test_compiled_total_bytes_counts_inputs_outputs_and_temporaries():
    x = jnp.ones((256, 64))  # float64: 128 KiB in, 128 KiB out
    compiled = jax.jit(lambda x: jnp.sin(x) @ x.T @ x).lower(x).compile()
    total = measure.compiled_total_bytes(compiled)
    assert total == 2 * x.nbytes + measure.compiled_temp_bytes(compiled)


def test_timing_and_peak_memory():
    ms = measure.median_time_ms(lambda: time.sleep(0.02), repeats=3)
    assert 20 <= ms < 1000
    peak = measure.peak_memory_bytes()
    if jax.devices()[0].platform == "cpu":
        assert peak is None  # the CPU backend reports no peak
    else:
        assert peak is not None and peak > 0
