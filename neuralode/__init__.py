"""neuralode: neural ODEs in JAX with memory-efficient, exact gradients."""

from . import data as data
from ._cli import (
    RESUME_MAY_CHANGE as RESUME_MAY_CHANGE,
)
from ._cli import (
    SOLVERS as SOLVERS,
)
from ._cli import (
    add_training_arguments as add_training_arguments,
)
from ._cli import (
    adjoint_from_args as adjoint_from_args,
)
from ._cli import (
    exit_on_training_error as exit_on_training_error,
)
from ._cli import (
    parse_training_args as parse_training_args,
)
from ._cli import (
    positive_float as positive_float,
)
from ._cli import (
    positive_int as positive_int,
)
from ._cli import (
    run_config as run_config,
)
from ._cli import (
    solver_from_name as solver_from_name,
)
from ._cli import (
    stepping_from_args as stepping_from_args,
)
from ._fields import MLPField as MLPField
from ._measure import (
    EvaluationCounter as EvaluationCounter,
)
from ._measure import (
    fit_exponent as fit_exponent,
)
from ._measure import (
    fit_increment as fit_increment,
)
from ._measure import (
    median_time_ms as median_time_ms,
)
from ._measure import (
    peak_memory_bytes as peak_memory_bytes,
)
from ._measure import (
    relative_error as relative_error,
)
from ._measure import (
    xla_temp_bytes as xla_temp_bytes,
)
from ._model import NeuralODE as NeuralODE
from ._train import (
    CheckpointError as CheckpointError,
)
from ._train import (
    TrainingDiverged as TrainingDiverged,
)
from ._train import (
    TrainingStopped as TrainingStopped,
)
from ._train import (
    TrainResult as TrainResult,
)
from ._train import (
    fit as fit,
)
from ._train import (
    function_evaluations as function_evaluations,
)
from ._train import (
    load_checkpoint as load_checkpoint,
)
from ._train import (
    plot_loss as plot_loss,
)
from ._train import (
    save_checkpoint as save_checkpoint,
)
from ._train import (
    save_metrics as save_metrics,
)
from .adjoints import (
    ADJOINT_NAMES as ADJOINT_NAMES,
)
from .adjoints import (
    BackpropAdjoint as BackpropAdjoint,
)
from .adjoints import (
    ContinuousAdjoint as ContinuousAdjoint,
)
from .adjoints import (
    SymplecticAdjoint as SymplecticAdjoint,
)
from .adjoints import (
    get_adjoint as get_adjoint,
)

__version__ = "0.1.0"
