"""Two-dimensional toy densities, sampled in code (the test problems of FFJORD,
Grathwohl et al. 2019), and the fitted-Gaussian baseline."""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

TOY_DENSITIES: tuple[str, ...] = (
    "8gaussians",
    "2spirals",
    "checkerboard",
    "moons",
    "circles",
)


def _eight_gaussians(key, n):
    k1, k2 = jax.random.split(key)
    angles = 2 * jnp.pi * jax.random.randint(k1, (n,), 0, 8).astype(float) / 8
    centres = 4.0 * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    return (centres + 0.5 * jax.random.normal(k2, (n, 2))) / np.sqrt(2)


def _two_spirals(key, n):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    radius = jnp.sqrt(jax.random.uniform(k1, (n,))) * 540 * (2 * jnp.pi) / 360
    jitter = 0.5 * jax.random.uniform(k2, (n, 2))
    arm = jnp.stack([-jnp.cos(radius) * radius, jnp.sin(radius) * radius], -1) + jitter
    sign = jnp.where(jax.random.bernoulli(k3, 0.5, (n, 1)), 1.0, -1.0)
    return sign * arm / 3 + 0.1 * jax.random.normal(k4, (n, 2))


def _checkerboard(key, n):
    k1, k2, k3 = jax.random.split(key, 3)
    x1 = 4 * jax.random.uniform(k1, (n,)) - 2
    x2 = jax.random.uniform(k2, (n,))
    x2 = x2 - 2 * jax.random.randint(k3, (n,), 0, 2).astype(x2.dtype)
    x2 = x2 + jnp.floor(x1) % 2
    return 2 * jnp.stack([x1, x2], axis=-1)


def _moons(key, n):
    k1, k2, k3 = jax.random.split(key, 3)
    angle = jnp.pi * jax.random.uniform(k1, (n,))
    outer = jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1)
    inner = jnp.stack([1 - jnp.cos(angle), 0.5 - jnp.sin(angle)], -1)
    points = jnp.where(jax.random.bernoulli(k2, 0.5, (n, 1)), outer, inner)
    points = points + 0.1 * jax.random.normal(k3, (n, 2))
    return 2 * points + jnp.array([[-1.0, -0.2]])


def _circles(key, n):
    k1, k2, k3 = jax.random.split(key, 3)
    angle = 2 * jnp.pi * jax.random.uniform(k1, (n,))
    radius = jnp.where(jax.random.bernoulli(k2, 0.5, (n,)), 1.0, 0.5)
    points = radius[:, None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1)
    return 3 * (points + 0.08 * jax.random.normal(k3, (n, 2)))


_SAMPLERS = {
    "8gaussians": _eight_gaussians,
    "2spirals": _two_spirals,
    "checkerboard": _checkerboard,
    "moons": _moons,
    "circles": _circles,
}


def sample_toy_density(name: str, key: PRNGKeyArray, num: int) -> Float[Array, "num 2"]:
    """Draw `num` points from the 2-D toy density `name`, one of
    `neuralode.data.TOY_DENSITIES`: eight Gaussians on a circle, two interleaved
    spirals,
    a checkerboard, two moons, two concentric circles. All lie roughly in [-4, 4]²."""
    try:
        sampler = _SAMPLERS[name]
    except KeyError:
        raise ValueError(
            f"Unknown toy density {name!r}; valid names are {list(TOY_DENSITIES)}."
        ) from None
    return sampler(key, num)


def gaussian_nll(
    train: Float[ArrayLike, "n dim"], test: Float[ArrayLike, "m dim"]
) -> float:
    """The baseline: mean negative log-likelihood (nats per point) of `test` under the
    Gaussian fitted by maximum likelihood (mean and covariance) to `train`."""
    train = np.asarray(train, np.float64)
    test = np.asarray(test, np.float64)
    mean = train.mean(0)
    cov = np.cov(train, rowvar=False, bias=True)
    diff = test - mean
    _, logdet = np.linalg.slogdet(cov)
    maha = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
    dim = train.shape[1]
    return float(np.mean(0.5 * (maha + logdet + dim * np.log(2 * np.pi))))
