"""neuralode: neural ODEs in JAX with memory-efficient, exact gradients."""

from ._fields import MLPField as MLPField
from ._model import NeuralODE as NeuralODE
from .adjoints import (
    ADJOINT_NAMES as ADJOINT_NAMES,
    BackpropAdjoint as BackpropAdjoint,
    get_adjoint as get_adjoint,
    SymplecticAdjoint as SymplecticAdjoint,
)
from ._measure import (
    median_time_ms as median_time_ms,
    peak_memory_bytes as peak_memory_bytes,
    relative_error as relative_error,
    xla_temp_bytes as xla_temp_bytes,
)

__version__ = "0.1.0"
