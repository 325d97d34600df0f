"""Synthetic data sets, generated in code: trajectories of known ODEs (the spiral, a
damped pendulum) with window sampling, and 2-D toy densities."""

from ._densities import (
    gaussian_nll as gaussian_nll,
    sample_toy_density as sample_toy_density,
    TOY_DENSITIES as TOY_DENSITIES,
)
from ._trajectories import (
    damped_pendulum_field as damped_pendulum_field,
    damped_pendulum_trajectories as damped_pendulum_trajectories,
    sample_windows as sample_windows,
    simulate as simulate,
    spiral_field as spiral_field,
    SPIRAL_A as SPIRAL_A,
    spiral_trajectory as spiral_trajectory,
    SPIRAL_Y0 as SPIRAL_Y0,
)
