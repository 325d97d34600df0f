"""Training neural ODEs: a jitted train step, checkpoints, and a loop that uses them.

Opt-in: `import neuralode` does not import it; `import neuralode.training` does.

- `make_train_step` builds one pure, jitted iteration of an optax optimiser on a
    `TrainState`, for a loop of your own.
- `Checkpoint` writes a state and the run's record atomically and reads it back.
- `fit` is a loop over both: metrics (your own through `metrics=`), a progress bar,
    periodic checkpoints, exact resume, and a stop (divergence, a failing step, Ctrl-C
    or SIGTERM) that checkpoints the last good state first; `devices=` makes it data
    parallel.
- `data_parallel_mesh`, `replicate` and `local_copy` spread a step of your own over
    devices and processes (JAX's SPMD: the batch split, the state replicated).
"""

from ._checkpoint import (
    Checkpoint as Checkpoint,
    CheckpointError as CheckpointError,
    check_output_dir as check_output_dir,
)
from ._loop import (
    StepInfo as StepInfo,
    TrainingDiverged as TrainingDiverged,
    TrainingStopped as TrainingStopped,
    TrainResult as TrainResult,
    fit as fit,
    save_metrics as save_metrics,
)
from ._parallel import (
    data_parallel_mesh as data_parallel_mesh,
    local_copy as local_copy,
    replicate as replicate,
)
from ._signals import interrupt_on_sigterm as interrupt_on_sigterm
from ._step import (
    StepOutput as StepOutput,
    TrainState as TrainState,
    make_train_step as make_train_step,
)
