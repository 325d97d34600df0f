"""Trajectories of known ODEs, and random windows of them for minibatch training."""

from collections.abc import Callable
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

SPIRAL_A = np.array([[-0.1, 2.0], [-2.0, -0.1]], dtype=np.float32)
SPIRAL_Y0 = np.array([2.0, 0.0], dtype=np.float32)


def spiral_field(
    t: ArrayLike, y: Float[Array, "... 2"], args: Any = None
) -> Float[Array, "... 2"]:
    """The spiral ODE dy/dt = (y³) A with A = [[-0.1, 2], [-2, -0.1]] (the problem of
    torchdiffeq's `ode_demo.py`); `y` has shape `(..., 2)`."""
    del t, args
    return (y**3) @ jnp.asarray(SPIRAL_A, y.dtype)


def damped_pendulum_field(
    t: ArrayLike,
    y: Float[Array, "... 2"],
    args: Any = None,
    *,
    omega_sq: float = 4.0,
    damping: float = 0.3,
) -> Float[Array, "... 2"]:
    """A damped pendulum, y = (angle θ, angular velocity ω):
    dθ/dt = ω, dω/dt = −omega_sq·sin θ − damping·ω. `y` has shape `(..., 2)`."""
    del t, args
    theta, omega = y[..., 0], y[..., 1]
    return jnp.stack([omega, -omega_sq * jnp.sin(theta) - damping * omega], axis=-1)


def simulate(
    field: Callable[[Any, Array, None], Array],
    y0: Float[ArrayLike, "... dim"],
    ts: Float[ArrayLike, " times"],
    *,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    max_steps: int = 1_000_000,
    throw: bool = True,
) -> Float[Array, "times ... dim"]:
    """Solve dy/dt = field(t, y, None) from `y0` at `ts[0]`, saved at `ts`, accurately
    (Tsit5, by default rtol 1e-7, atol 1e-9): the ground truth the examples fit. With
    `throw=False` a failed solve returns Diffrax's inf-filled states instead of raising.

    **Returns:**

    `ys` of shape `(len(ts), *y0.shape)`.
    """
    ts = jnp.asarray(ts)
    y0 = jnp.asarray(y0)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        diffrax.Tsit5(),
        t0=ts[0],
        t1=ts[-1],
        dt0=None,
        y0=y0,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
        throw=throw,
    )
    assert sol.ys is not None  # SaveAt(ts=...) saves the states
    return sol.ys


def spiral_trajectory(
    num_times: int = 1000, t1: float = 25.0
) -> tuple[Float[Array, " times"], Float[Array, "times 2"]]:
    """The spiral ODE (`neuralode.data.spiral_field`) from y0 = [2, 0], sampled at
    `num_times` equally spaced times on [0, t1] (torchdiffeq's defaults: 1000 on
    [0, 25]).

    **Returns:**

    `(ts, ys)` with `ys` of shape `(num_times, 2)`.
    """
    ts = jnp.linspace(0.0, t1, num_times)
    return ts, simulate(spiral_field, jnp.asarray(SPIRAL_Y0), ts)


def damped_pendulum_trajectories(
    key: PRNGKeyArray,
    num_trajectories: int,
    ts: Float[ArrayLike, " times"],
    *,
    max_angle: float = 2.5,
    max_velocity: float = 2.0,
) -> Float[Array, "trajectories times 2"]:
    """Trajectories of the damped pendulum (`neuralode.data.damped_pendulum_field`)
    from initial angles uniform in ±`max_angle` and velocities uniform in
    ±`max_velocity`, saved at `ts`.

    **Returns:**

    `ys` of shape `(num_trajectories, len(ts), 2)`.
    """
    bounds = jnp.array([max_angle, max_velocity])
    y0 = jax.random.uniform(key, (num_trajectories, 2), minval=-bounds, maxval=bounds)
    ys = simulate(damped_pendulum_field, y0, ts)
    return jnp.swapaxes(ys, 0, 1)


def sample_windows(
    key: PRNGKeyArray,
    ys: Float[Array, "trajectories times dim"] | Float[Array, "times dim"],
    batch_size: int,
    window: int,
) -> tuple[Float[Array, "batch dim"], Float[Array, "window batch dim"]]:
    """Draw `batch_size` windows of `window` consecutive samples from trajectories `ys`
    (shape `(times, dim)` for one, `(trajectories, times, dim)` for several), uniformly
    over trajectories and start times. Traceable: use it inside a jitted step.

    **Returns:**

    `(y0, targets)`: the first state of each window, shape `(batch_size, dim)`, and the
    whole windows, shape `(window, batch_size, dim)` (time first, as `NeuralODE` returns
    them).
    """
    if ys.ndim == 2:
        ys = ys[None]
    num_traj, num_times = ys.shape[:2]
    if not 2 <= window <= num_times:
        raise ValueError(
            f"sample_windows: `window` must be in [2, {num_times}] (the trajectory "
            f"length), got {window}."
        )
    traj_key, start_key = jax.random.split(key)
    traj = jax.random.randint(traj_key, (batch_size,), 0, num_traj)
    start = jax.random.randint(start_key, (batch_size,), 0, num_times - window + 1)
    index = start[None, :] + jnp.arange(window)[:, None]
    targets = ys[traj[None, :], index]
    return targets[0], targets
