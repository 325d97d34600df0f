"""neuralode: neural ODEs in JAX with memory-efficient, exact gradients.

The gradient strategies are `diffrax.AbstractAdjoint`s, for
`diffrax.diffeqsolve(..., adjoint=...)`; `get_adjoint` builds one by name. `NeuralODE`
bundles a vector field (e.g. `MLPField`), a solver, step control and a strategy.
Measuring lives in `neuralode.measure`, training in `neuralode.training` (opt-in).
"""

from . import data as data
from ._fields import MLPField as MLPField
from ._model import NeuralODE as NeuralODE
from .adjoints import (
    ADJOINT_NAMES as ADJOINT_NAMES,
    BackpropAdjoint as BackpropAdjoint,
    Choice as Choice,
    ContinuousAdjoint as ContinuousAdjoint,
    Reversible as Reversible,
    ReversibleAdjoint as ReversibleAdjoint,
    SymplecticAdjoint as SymplecticAdjoint,
    choose_adjoint as choose_adjoint,
    get_adjoint as get_adjoint,
)

__version__ = "0.1.0"
