"""Synthetic data sets, generated in code: trajectories of known ODEs (the spiral, a
damped pendulum) with window sampling, and 2-D toy densities."""

from ._densities import (
    TOY_DENSITIES as TOY_DENSITIES,
    gaussian_nll as gaussian_nll,
    sample_toy_density as sample_toy_density,
)
from ._trajectories import (
    SPIRAL_A as SPIRAL_A,
    SPIRAL_Y0 as SPIRAL_Y0,
    damped_pendulum_field as damped_pendulum_field,
    damped_pendulum_trajectories as damped_pendulum_trajectories,
    sample_windows as sample_windows,
    simulate as simulate,
    spiral_field as spiral_field,
    spiral_trajectory as spiral_trajectory,
)
