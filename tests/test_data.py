"""The synthetic data sets: trajectories are solutions, windows are slices of them, the
toy densities have the right shapes, and the Gaussian baseline is a proper NLL."""

import jax.numpy as jnp
import numpy as np
import pytest

import neuralode


def test_simulate_is_accurate():
    ts = jnp.linspace(0.0, 2.0, 5)
    ys = neuralode.data.simulate(lambda t, y, args: -y, jnp.array([1.0, 2.0]), ts)
    np.testing.assert_allclose(
        ys, np.exp(-ts)[:, None] * np.array([1.0, 2.0]), rtol=1e-5
    )


def test_spiral_trajectory():
    ts, ys = neuralode.data.spiral_trajectory(num_times=201, t1=1.0)
    assert ts.shape == (201,) and ys.shape == (201, 2)
    np.testing.assert_allclose(ys[0], neuralode.data.SPIRAL_Y0)
    # Finite differences follow the field dy/dt = (y³)A.
    dy = (ys[2:] - ys[:-2]) / (ts[2] - ts[0])
    field = neuralode.data.spiral_field(0.0, ys[1:-1])
    np.testing.assert_allclose(dy, field, rtol=0.01, atol=0.01)


def test_damped_pendulum_loses_energy(getkey):
    ts = jnp.linspace(0.0, 5.0, 11)
    ys = neuralode.data.damped_pendulum_trajectories(getkey(), 3, ts)
    assert ys.shape == (3, 11, 2)
    energy = 0.5 * ys[..., 1] ** 2 + 4.0 * (1 - jnp.cos(ys[..., 0]))
    assert bool(jnp.all(jnp.diff(energy, axis=1) <= 1e-6))


def test_sample_windows(getkey):
    ys = jnp.arange(2 * 7 * 3, dtype=jnp.float32).reshape(2, 7, 3)
    y0, windows = neuralode.data.sample_windows(getkey(), ys, 5, 4)
    assert y0.shape == (5, 3) and windows.shape == (4, 5, 3)
    np.testing.assert_array_equal(y0, windows[0])
    for b in range(5):
        flat = np.asarray(ys).reshape(-1, 3)
        row = int(np.where((flat == np.asarray(windows[0, b])).all(-1))[0][0])
        np.testing.assert_array_equal(windows[:, b], flat[row : row + 4])
        assert row % 7 + 4 <= 7  # does not run into the next trajectory
    y0, windows = neuralode.data.sample_windows(getkey(), ys[0], 2, 7)
    assert windows.shape == (7, 2, 3)
    with pytest.raises(ValueError, match="window"):
        neuralode.data.sample_windows(getkey(), ys, 2, 8)


@pytest.mark.parametrize("name", neuralode.data.TOY_DENSITIES)
def test_toy_densities(name, getkey):
    x = neuralode.data.sample_toy_density(name, getkey(), 500)
    assert x.shape == (500, 2) and bool(jnp.all(jnp.isfinite(x)))
    assert float(jnp.max(jnp.abs(x))) < 6.0
    # Spread out, not collapsed to a point.
    assert float(jnp.std(x)) > 0.5


def test_toy_density_unknown_name(getkey):
    with pytest.raises(ValueError, match="Unknown toy density"):
        neuralode.data.sample_toy_density("swissroll", getkey(), 4)


def test_gaussian_nll_is_the_entropy_for_gaussian_data():
    rng = np.random.default_rng(0)
    cov = np.array([[2.0, 0.5], [0.5, 1.0]])
    train = rng.multivariate_normal([1.0, -1.0], cov, size=20000)
    test = rng.multivariate_normal([1.0, -1.0], cov, size=20000)
    entropy = 0.5 * np.log(np.linalg.det(2 * np.pi * np.e * cov))
    assert neuralode.data.gaussian_nll(train, test) == pytest.approx(entropy, abs=0.03)
