"""neuralode: neural ODEs in JAX with memory-efficient, exact gradients."""

from ._fields import MLPField as MLPField
from ._model import NeuralODE as NeuralODE
from .adjoints import (
    ADJOINT_NAMES as ADJOINT_NAMES,
    BackpropAdjoint as BackpropAdjoint,
    get_adjoint as get_adjoint,
    SymplecticAdjoint as SymplecticAdjoint,
)

__version__ = "0.1.0"
