"""The training loop: jitted steps, metrics, a progress bar, periodic atomic
checkpoints, and a stop that checkpoints the last good state.

However training stops (divergence, a failing step, Ctrl-C or SIGTERM), the last good
state is checkpointed first, so that nothing trained is lost. The step donates the
state's buffers, so the state that went into a step that failed is gone; it is
recomputed from the last checkpoint (or the initial state) by replaying the iterations
since, which gives it exactly: a step is a deterministic function of the state.

On several devices (`devices=`), the step is data parallel (`._parallel`); across
processes every process runs this loop, and only process 0 writes files.
"""

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.stages
import numpy as np
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Float, PRNGKeyArray, PyTree
from tqdm.auto import tqdm

from .._checks import as_int
from ..measure import compiled_temp_bytes
from ._checkpoint import Checkpoint, CheckpointError, check_output_dir, write_atomic
from ._parallel import (
    BatchAxes,
    batch_shardings,
    data_parallel_mesh,
    device_counts,
    is_writer,
    local_copy,
    replicate,
)
from ._signals import StopRequests
from ._step import StepOutput, TrainState, make_train_step


class TrainingStopped(RuntimeError):
    """Training stopped before `niters`: a step failed at run time (for example a solve
    reached `max_steps`). The last good state is checkpointed."""


class TrainingDiverged(TrainingStopped):
    """The loss (or the updated parameters) became NaN or infinite."""


class StepInfo(NamedTuple):
    """One finished iteration, as a metric function sees it: its number `iteration`
    (from 1), its `loss`, the loss function's `aux` output and its wall time
    `seconds`."""

    iteration: int
    loss: float
    aux: PyTree
    seconds: float


class TrainResult(NamedTuple):
    """What `neuralode.training.fit` returns: the trained `model` and the `metrics` dict
    that was written to `metrics.json`."""

    model: PyTree
    metrics: dict[str, Any]


MetricFn = Callable[[StepInfo], float | int]
Step = Callable[[TrainState], tuple[TrainState, StepOutput]]


def fit(
    loss_fn: Callable[[PyTree, Any], tuple[Float[Array, ""], PyTree]],
    model: PyTree,
    optimiser: optax.GradientTransformation,
    sample_batch: Callable[[PRNGKeyArray], Any],
    *,
    niters: int,
    key: PRNGKeyArray,
    out_dir: str | os.PathLike[str],
    metrics: Mapping[str, MetricFn] | None = None,
    config: dict[str, Any] | None = None,
    may_change: Collection[str] = (),
    metadata: dict[str, Any] | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "train",
    devices: int | Literal["all"] = 1,
    batch_axes: BatchAxes = 0,
) -> TrainResult:
    """Train `model` for `niters` iterations of `optimiser` on `loss_fn`, with a
    progress bar, metrics and checkpoints under `out_dir`.

    One iteration is one call of the step `neuralode.training.make_train_step` builds,
    compiled once before the first iteration; `metrics["memory_bytes"]` is XLA's static
    temporary-buffer size of that compiled step (the figure
    `neuralode.measure.xla_temp_bytes` reports).

    **Arguments:**

    - `loss_fn`: `loss_fn(model, batch) -> (loss, aux)`: a scalar loss and anything
        else the metric functions read (e.g. the number of function evaluations).
    - `model`: the initial model, an Equinox module (e.g. a `neuralode.NeuralODE`). On
        resume it is the template the checkpoint is loaded into. It is not modified.
    - `optimiser`: an `optax.GradientTransformation`. On resume, its state must have
        the same structure (a changed learning rate is fine).
    - `sample_batch`: `sample_batch(key) -> batch`, traceable by JAX.
    - `niters`: the total number of iterations, counting those of a resumed run.
    - `key`: a `jax.random.PRNGKey`; the first batch is drawn from it. Ignored on resume
        (the checkpoint's key is used).
    - `out_dir`: the directory for `metrics.json` and `checkpoint.eqx` (created).
    - `metrics`: `{name: fn}`: after each iteration `fn(neuralode.training.StepInfo)`
        gives a number recorded under `name` (beside `loss` and `time_s`), e.g.
        `{"nfe": lambda step: int(step.aux)}`. A resumed run must record the same names.
    - `config`: a JSON-serialisable dict of what defines the run (model sizes, data,
        solver, learning rate, ...). It is stored in the checkpoint and compared on
        resume.
    - `may_change`: keys of `config` that a resumed run may change (for example the
        learning rate or the gradient strategy); the changes are printed. Any other
        difference refuses the resume.
    - `metadata`: extra JSON-serialisable entries for `metrics.json`.
    - `checkpoint_every`: write a checkpoint every this many iterations, and at the end.
    - `resume`: continue from `out_dir/checkpoint.eqx`.
    - `overwrite`: start afresh even though `out_dir` holds a checkpoint (without it,
        and without `resume`, such a checkpoint is refused rather than replaced).
    - `progress`: show the progress bar.
    - `desc`: the progress bar's label.
    - `devices`: train data parallel on this many devices of each process, or
        `"all"` of them: the minibatch is split across the devices, the parameters
        and optimiser state are replicated, and XLA sums the gradient over them. The
        batch, and therefore the losses, are those of one device. A solve in
        `loss_fn` keeps its part of the batch on each device through `NeuralODE`; a
        `diffrax.diffeqsolve` of your own needs `throw=False`, as Diffrax's run-time
        check would gather the whole batch onto every device.
        With `jax.distributed.initialize` called first, every process runs `fit`
        alike, the mesh spans all of them, and only process 0 writes files.
    - `batch_axes`: the batch axis of each leaf of the minibatch, as `jax.vmap`'s
        `in_axes` (an int, or a prefix tree of ints and None); its size must be
        divisible by the total number of devices.

    **Returns:**

    A `neuralode.training.TrainResult` `(model, metrics)`. `metrics` has `loss`,
    `time_s` (wall seconds of each iteration) and one list per entry of `metrics` (one
    value per iteration each), `memory_bytes` (per device), `compile_s`,
    `iterations`, `devices` (in all processes), `processes`, `config` and the entries
    of `metadata`. The model's arrays are on one device of this process.

    **Raises:**

    Before anything is computed:

    - `neuralode.training.CheckpointError` if `out_dir` cannot be written; on resume if
        the checkpoint is missing, corrupt, or was written with a different `config` or
        other metrics; without `resume` or `overwrite` if `out_dir` already holds a
        checkpoint. Nothing is written then.
    - `ValueError` if there are fewer than `devices` devices, or the batch size is
        not divisible by their number.

    When training stops early, after checkpointing the last good state (its iteration
    is `metrics["iterations"]`; `metrics["stopped"]` says why):

    - `neuralode.training.TrainingDiverged` if the loss or the updated parameters are
        not finite;
    - `neuralode.training.TrainingStopped` if a step fails at run time (for example a
        `diffrax.diffeqsolve` that reaches `max_steps`);
    - `KeyboardInterrupt` on Ctrl-C or SIGTERM (when `fit` runs in the main thread,
        the first signal stops training after the current iteration, a second at
        once).
    """
    niters = as_int("fit", "niters", niters)
    checkpoint_every = as_int("fit", "checkpoint_every", checkpoint_every)
    metric_fns = dict(metrics or {})
    mesh = data_parallel_mesh(devices)
    batch_shardings(jax.eval_shape(sample_batch, key), batch_axes, mesh)  # checks
    run = _Run(
        out_dir, config, metadata, metric_fns, mesh, resume=resume, overwrite=overwrite
    )
    step = make_train_step(
        loss_fn, optimiser, sample_batch, model, mesh=mesh, batch_axes=batch_axes
    )

    def initial() -> TrainState:
        return replicate(TrainState.init(model, optimiser, key), mesh)

    state, start = run.start(initial(), may_change, desc) if resume else (initial(), 0)
    state = _train(
        run,
        step,
        state,
        start,
        initial,
        niters=niters,
        checkpoint_every=checkpoint_every,
        progress=progress,
        desc=desc,
    )
    if start >= niters and progress:
        print(f"{desc}: checkpoint is already at iteration {start} >= niters={niters}.")
    result = run.metrics()
    run.write_metrics(result)
    return TrainResult(eqx.combine(local_copy(state.params), model), result)


def _train(
    run: "_Run",
    step: jax.stages.Wrapped,
    state: TrainState,
    start: int,
    initial: Callable[[], TrainState],
    *,
    niters: int,
    checkpoint_every: int,
    progress: bool,
    desc: str,
) -> TrainState:
    """The state after iteration `niters`, trained from `state` after iteration
    `start`. However training stops, `run.stop` checkpoints the last good state
    first (recomputed from `initial()` if the failed step consumed it)."""
    # From here on, Ctrl-C or SIGTERM stops after an iteration.
    with StopRequests() as stop:
        compiled = run.compile(step, state)
        current = (state, start)  # replaced in one assignment: always a consistent pair
        bar = tqdm(total=niters, initial=start, desc=desc, disable=not progress)
        try:
            while current[1] < niters:
                if stop.requested:
                    raise KeyboardInterrupt
                state, done = current
                tic = time.perf_counter()
                state, out, finite = _run_step(compiled, state, done + 1)
                if not finite:
                    current = (state, done)  # the step did not apply the update
                    raise TrainingDiverged(
                        f"non-finite loss or parameters at iteration {done + 1} "
                        f"(loss {float(out.loss)}). Try a smaller learning rate or "
                        f"smaller/adaptive steps; if the saved state is already too "
                        f"far gone, start afresh (`overwrite=True`)."
                    )
                seconds = time.perf_counter() - tic
                values = run.record(
                    StepInfo(done + 1, float(out.loss), out.aux, seconds)
                )
                current = (state, done + 1)
                bar.set_postfix(_postfix(values), refresh=False)
                bar.update(1)
                if (done + 1) % checkpoint_every == 0 or done + 1 == niters:
                    run.save(*current)
        except (TrainingStopped, KeyboardInterrupt) as e:
            stop.hold()  # a further Ctrl-C must not cut the checkpoint short
            bar.close()
            raise run.stop(e, *current, compiled, initial) from None
        bar.close()
    return current[0]


def _run_step(
    compiled: Step,
    state: TrainState,
    iteration: int,
) -> tuple[TrainState, StepOutput, bool]:
    """One step, waited for; a failure at run time becomes `TrainingStopped`."""
    try:
        with _QuietCallbackFailures():
            state, out = compiled(state)
            return state, out, bool(out.finite)
    except jax.errors.JaxRuntimeError as e:
        raise TrainingStopped(
            f"iteration {iteration} failed: {_runtime_message(e)}"
        ) from None


class _Run:
    """A run's files and record: the checkpoint and metrics paths, the configuration,
    the history of every metric, and the iteration of the checkpoint on disk."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        config: dict[str, Any] | None,
        metadata: dict[str, Any] | None,
        metric_fns: Mapping[str, MetricFn],
        mesh: Mesh,
        *,
        resume: bool,
        overwrite: bool,
    ) -> None:
        reserved = {"loss", "time_s"} & set(metric_fns)
        if reserved:
            raise ValueError(f"fit: `metrics` may not be named {sorted(reserved)}.")
        self.config = _jsonable(config or {})
        self.metadata = _jsonable(metadata or {})
        self.checkpoint_path = check_output_dir(
            out_dir, resume=resume, overwrite=overwrite
        )
        self.metrics_path = os.path.join(out_dir, "metrics.json")
        self.writer = is_writer()
        if self.writer:
            os.makedirs(out_dir, exist_ok=True)
            if not resume and os.path.exists(self.checkpoint_path):
                os.remove(self.checkpoint_path)  # the old run must not be resumed
        self.history: dict[str, list[Any]] = {
            name: [] for name in ("loss", "time_s", *metric_fns)
        }
        self.saved = 0  # the iteration of the checkpoint on disk
        self.memory_bytes = 0
        self.compile_s = 0.0
        self.mesh = mesh
        self.metric_fns = metric_fns

    def start(
        self, like: TrainState, may_change: Collection[str], desc: str
    ) -> tuple[TrainState, int]:
        """The checkpoint's state and iteration, its history taken over."""
        checkpoint = self.load(like, may_change)
        if set(checkpoint.history) != set(self.history):
            raise CheckpointError(
                f"{self.checkpoint_path} records the metrics {sorted(checkpoint.history)}"
                f", but this run records {sorted(self.history)}: pass the same "
                f"`metrics` to resume it."
            )
        self.history, self.saved = checkpoint.history, checkpoint.iteration
        changed = [
            f"{k} {checkpoint.config.get(k)!r} -> {self.config.get(k)!r}"
            for k in sorted(may_change)
            if checkpoint.config.get(k) != self.config.get(k)
        ]
        if changed:
            print(
                f"{desc}: resuming at iteration {self.saved} with {', '.join(changed)}."
            )
        return checkpoint.state, checkpoint.iteration

    def load(self, like: TrainState, may_change: Collection[str] = ()) -> Checkpoint:
        """The checkpoint, its state replicated on the run's devices."""
        checkpoint = Checkpoint.load(
            self.checkpoint_path, local_copy(like), self.config, may_change
        )
        state = replicate(checkpoint.state, self.mesh)
        return dataclasses.replace(checkpoint, state=state)

    def compile(self, step: jax.stages.Wrapped, state: TrainState) -> Step:
        tic = time.perf_counter()
        compiled = step.lower(state).compile()
        self.compile_s = time.perf_counter() - tic
        self.memory_bytes = compiled_temp_bytes(compiled)
        return compiled

    def record(self, info: StepInfo) -> dict[str, Any]:
        """Append iteration `info`'s loss, time and metrics to the history; they are
        returned."""
        values = {"loss": info.loss, "time_s": info.seconds}
        values |= {name: fn(info) for name, fn in self.metric_fns.items()}
        for name, value in values.items():
            self.history[name].append(value)
        return values

    def save(self, state: TrainState, iteration: int) -> None:
        history = {name: values[:iteration] for name, values in self.history.items()}
        if self.writer:
            checkpoint = Checkpoint(local_copy(state), iteration, self.config, history)
            checkpoint.save(self.checkpoint_path)
        self.saved = iteration
        self.write_metrics(self.metrics())

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        if self.writer:
            save_metrics(self.metrics_path, metrics)

    def metrics(self, **extra: Any) -> dict[str, Any]:
        return {
            **self.metadata,
            **self.history,
            "iterations": len(self.history["loss"]),
            "memory_bytes": self.memory_bytes,
            "compile_s": self.compile_s,
            **device_counts(self.mesh),
            "config": self.config,
            **extra,
        }

    def stop(
        self,
        error: BaseException,
        state: TrainState,
        done: int,
        compiled: Step,
        initial: Callable[[], TrainState],
    ) -> BaseException:
        """Checkpoint the state after iteration `done` and write the metrics; the
        exception to raise, its message saying where training can continue."""
        for values in self.history.values():
            del values[done:]  # an interrupt may have come between the appends
        if done > self.saved:
            if any(
                isinstance(x, jax.Array) and x.is_deleted()
                for x in jax.tree_util.tree_leaves(state)
            ):
                state = self.load(initial()).state if self.saved else initial()
                for _ in range(self.saved, done):  # replay: the steps are deterministic
                    state, _ = compiled(state)
            self.save(state, done)
        kept = (
            f"{self.checkpoint_path} holds the state after iteration {done}: continue "
            f"from there with `resume=True`."
            if done
            else "Nothing was trained, so nothing was checkpointed."
        )
        if isinstance(error, KeyboardInterrupt):
            message = f"interrupted after iteration {done}. {kept}"
        else:
            message = f"{error} Training stopped. {kept}"
        self.write_metrics(self.metrics(stopped=message))
        return type(error)(message)


def save_metrics(path: str | os.PathLike[str], metrics: Mapping[str, Any]) -> None:
    """Write `metrics` as JSON to `path`, atomically (temporary file, then rename)."""
    write_atomic(path, (json.dumps(_jsonable(metrics), indent=1) + "\n").encode())


def _postfix(values: Mapping[str, Any]) -> dict[str, str]:
    shown = {k: f"{v:.4g}" for k, v in values.items() if k != "time_s"}
    return {**shown, "s_it": f"{values['time_s']:.3g}"}


class _QuietCallbackFailures:
    """JAX logs the whole traceback of a host callback that raises (Equinox's runtime
    errors, e.g. Diffrax's `max_steps`) before the error itself arrives; `fit` reports
    that error in one line, so the log would only bury it."""

    logger = logging.getLogger("jax._src.callback")

    def __enter__(self) -> None:
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc_info: object) -> None:
        self.logger.setLevel(self.level)


def _runtime_message(error: Exception) -> str:
    # A runtime error raised inside a compiled step (e.g. Diffrax's "maximum number of
    # solver steps") arrives wrapped in XLA's callback traceback: keep its own line.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "Error: " in line and not line.startswith(("INTERNAL", "File ")):
            return line.split("Error: ", 1)[1]
    return lines[0] if lines else type(error).__name__


def _jsonable(tree: Any) -> Any:
    # JSON round-trip: tuples become lists and numpy scalars Python numbers, so a config
    # compares equal to the one read back from a checkpoint.
    def default(x: Any) -> Any:
        if isinstance(x, (np.generic, np.ndarray, jax.Array)):
            return np.asarray(x).tolist()
        raise TypeError(f"not JSON-serialisable: {type(x).__name__}")

    return json.loads(json.dumps(tree, default=default))
