"""neuralode: neural ODEs in JAX with memory-efficient, exact gradients."""

from . import data as data
from ._cli import (
    RESUME_MAY_CHANGE as RESUME_MAY_CHANGE,
    SOLVERS as SOLVERS,
    add_training_arguments as add_training_arguments,
    adjoint_from_args as adjoint_from_args,
    exit_on_training_error as exit_on_training_error,
    parse_training_args as parse_training_args,
    positive_float as positive_float,
    positive_int as positive_int,
    run_config as run_config,
    solver_from_name as solver_from_name,
    stepping_from_args as stepping_from_args,
)
from ._fields import MLPField as MLPField
from ._model import NeuralODE as NeuralODE
from ._train import (
    CheckpointError as CheckpointError,
    TrainingDiverged as TrainingDiverged,
    TrainingStopped as TrainingStopped,
    TrainResult as TrainResult,
    fit as fit,
    function_evaluations as function_evaluations,
    load_checkpoint as load_checkpoint,
    plot_loss as plot_loss,
    save_checkpoint as save_checkpoint,
    save_metrics as save_metrics,
)
from .adjoints import (
    ADJOINT_NAMES as ADJOINT_NAMES,
    BackpropAdjoint as BackpropAdjoint,
    ContinuousAdjoint as ContinuousAdjoint,
    SymplecticAdjoint as SymplecticAdjoint,
    get_adjoint as get_adjoint,
)

__version__ = "0.1.0"
