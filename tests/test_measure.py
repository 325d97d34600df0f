import diffrax
import jax.numpy as jnp
import numpy as np
import pytest

import neuralode


def test_fit_exponent_recovers_power_law():
    xs = np.array([16, 32, 64, 128, 256])
    assert neuralode.fit_exponent(xs, 3.0 * xs**1.0) == pytest.approx(1.0)
    assert neuralode.fit_exponent(xs, 5.0 * xs**2.5) == pytest.approx(2.5)
    assert neuralode.fit_exponent(xs, np.full(5, 7.0)) == pytest.approx(0.0, abs=1e-12)
    # Non-positive and missing values are dropped; one point is not a fit.
    assert neuralode.fit_exponent([1, 2, 4, 8], [0, 2, 4, None]) == pytest.approx(1.0)
    assert np.isnan(neuralode.fit_exponent([4], [2]))


def test_fit_increment_is_the_linear_slope():
    xs = np.array([16, 64, 256])
    assert neuralode.fit_increment(xs, 128 * xs + 1000) == pytest.approx(128.0)
    assert np.isnan(neuralode.fit_increment([3, 3], [1, 2]))


def test_relative_error():
    a = {"w": jnp.ones(3), "b": jnp.zeros(2)}
    b = {"w": jnp.ones(3) * 1.5, "b": jnp.zeros(2)}
    assert neuralode.relative_error(a, a) == 0.0
    assert neuralode.relative_error(b, a) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        neuralode.relative_error([jnp.ones(1)], [jnp.ones(1), jnp.ones(1)])


def test_evaluation_counter_counts_runtime_evaluations():
    counter = neuralode.EvaluationCounter()
    term = diffrax.ODETerm(counter.wrap(lambda t, y, args: -y))

    def solve(y0):
        return diffrax.diffeqsolve(
            term, diffrax.Heun(), 0.0, 1.0, 0.25, y0, max_steps=4
        ).ys[-1]

    import jax

    jax.block_until_ready(jax.jit(solve)(jnp.ones(2)))
    assert counter.count == 4 * 2  # 4 steps, 2 stages each
    counter.reset()
    jax.block_until_ready(jax.jit(solve)(jnp.ones(2)))
    assert counter.count == 8


def test_xla_temp_bytes_and_timing():
    fn = lambda x: jnp.sin(x) @ jnp.cos(x).T
    assert neuralode.xla_temp_bytes(fn, jnp.ones((64, 64))) >= 0
    assert neuralode.median_time_ms(fn, jnp.ones((8, 8)), repeats=3) > 0
    assert neuralode.peak_memory_bytes() is None or neuralode.peak_memory_bytes() >= 0
