"""Synthetic data sets, generated in code: trajectories of known ODEs (the spiral, a
damped pendulum) with window sampling, and 2-D toy densities."""

from ._densities import (
    TOY_DENSITIES as TOY_DENSITIES,
)
from ._densities import (
    gaussian_nll as gaussian_nll,
)
from ._densities import (
    sample_toy_density as sample_toy_density,
)
from ._trajectories import (
    SPIRAL_A as SPIRAL_A,
)
from ._trajectories import (
    SPIRAL_Y0 as SPIRAL_Y0,
)
from ._trajectories import (
    damped_pendulum_field as damped_pendulum_field,
)
from ._trajectories import (
    damped_pendulum_trajectories as damped_pendulum_trajectories,
)
from ._trajectories import (
    sample_windows as sample_windows,
)
from ._trajectories import (
    simulate as simulate,
)
from ._trajectories import (
    spiral_field as spiral_field,
)
from ._trajectories import (
    spiral_trajectory as spiral_trajectory,
)
