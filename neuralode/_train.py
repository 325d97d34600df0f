"""The training loop the examples share: a jitted optax step, a progress bar, metrics,
atomic checkpoints that a run can resume from exactly, and a stop on a non-finite loss.

Everything random in a step (the minibatch, Hutchinson noise) is drawn inside the jitted
step from a key that the step splits and returns. The key is part of the checkpoint, so
a resumed run draws the same batches as an uninterrupted one and gives the same losses.
However training stops (divergence, a failing solve, Ctrl-C or SIGTERM), the last good
state is checkpointed first, so that nothing trained is lost.
"""

import io
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, PRNGKeyArray, PyTree
from tqdm.auto import tqdm

from ._checks import as_int

CHECKPOINT_NAME = "checkpoint.eqx"
METRICS_NAME = "metrics.json"
_MAGIC = b"NEURALODE-CHECKPOINT 1\n"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, belongs to a different configuration, would be
    overwritten, or cannot be written."""


class TrainingStopped(RuntimeError):
    """Training stopped before `niters`: a step failed at run time (for example a solve
    reached `max_steps`). The last good state is checkpointed."""


class TrainingDiverged(TrainingStopped):
    """The loss (or the updated parameters) became NaN or infinite."""


class TrainResult(NamedTuple):
    """What `neuralode.fit` returns: the trained `model` and the `metrics` dict that was
    written to `metrics.json`."""

    model: PyTree
    metrics: dict


def function_evaluations(solver: diffrax.AbstractSolver, num_steps: Array) -> Array:
    """Evaluations of the vector field that an explicit Runge--Kutta solve made in
    `num_steps` steps (accepted and rejected), as counted from
    `diffrax.Solution.stats["num_steps"]`.

    A step of an `s`-stage method costs `s` evaluations, or `s - 1` for a method whose
    last stage is the first stage of the next step (FSAL: Bosh3, Tsit5, Dopri5,
    Dopri8), which then costs one extra evaluation at the start. The count is that of
    the forward solve;
    a gradient strategy adds its own (e.g. the continuous adjoint's backward solve).

    **Arguments:**

    - `solver`: the Diffrax solver used: `diffrax.Euler` or an explicit Runge--Kutta
        solver (`diffrax.AbstractERK`).
    - `num_steps`: `solution.stats["num_steps"]`.

    **Returns:**

    The number of evaluations, an integer array like `num_steps`.
    """
    if type(solver) is diffrax.Euler:
        return num_steps
    tableau = getattr(solver, "tableau", None)
    if not isinstance(solver, diffrax.AbstractERK) or tableau is None:
        raise ValueError(
            f"function_evaluations: expected diffrax.Euler or an explicit Runge--Kutta "
            f"solver with a Butcher tableau, got {type(solver).__name__}."
        )
    if tableau.fsal:
        return num_steps * (tableau.num_stages - 1) + 1
    return num_steps * tableau.num_stages


def fit(
    loss_fn: Callable[[PyTree, Any], tuple[Array, Array]],
    model: PyTree,
    optimiser: optax.GradientTransformation,
    sample_batch: Callable[[PRNGKeyArray], Any],
    *,
    niters: int,
    key: PRNGKeyArray,
    out_dir: str | os.PathLike,
    config: dict | None = None,
    may_change: Collection[str] = (),
    metadata: dict | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Train `model` for `niters` iterations of `optimiser` on `loss_fn`, with a
    progress bar, metrics and checkpoints under `out_dir`.

    One iteration is one jitted call that splits the key, draws a minibatch with
    `sample_batch`, takes the gradient of `loss_fn` with respect to the model's floating
    point arrays, and applies the optax update. It is compiled once, before the first
    iteration; `metrics["memory_bytes"]` is XLA's static temporary-buffer size of that
    compiled step (the figure `neuralode.xla_temp_bytes` reports).

    **Arguments:**

    - `loss_fn`: `loss_fn(model, batch) -> (loss, nfe)`: a scalar loss and the number of
        vector-field evaluations it made (see `neuralode.function_evaluations`).
    - `model`: the initial model, an Equinox module (for example a
        `neuralode.NeuralODE`).
        On resume it is the template the checkpoint is loaded into.
    - `optimiser`: an `optax.GradientTransformation`. On resume, its state must have
        the same structure (a changed learning rate is fine).
    - `sample_batch`: `sample_batch(key) -> batch`, traceable by JAX.
    - `niters`: the total number of iterations, counting those of a resumed run.
    - `key`: a `jax.random.PRNGKey`; the first batch is drawn from it. Ignored on resume
        (the checkpoint's key is used).
    - `out_dir`: the directory for `metrics.json` and `checkpoint.eqx` (created).
    - `config`: a JSON-serialisable dict of what defines the run (model sizes, data,
        solver, learning rate, ...). It is stored in the checkpoint and compared on
        resume.
    - `may_change`: keys of `config` that a resumed run may change (for example the
        learning rate or the gradient strategy); the changes are printed. Any other
        difference refuses the resume.
    - `metadata`: extra JSON-serialisable entries for `metrics.json` (e.g. `adjoint`).
    - `checkpoint_every`: write a checkpoint every this many iterations, and at the end.
    - `resume`: continue from `out_dir/checkpoint.eqx`.
    - `overwrite`: start afresh even though `out_dir` holds a checkpoint (without it,
        and without `resume`, such a checkpoint is refused rather than replaced).
    - `progress`: show the progress bar.
    - `desc`: the progress bar's label.

    **Returns:**

    A `neuralode.TrainResult` `(model, metrics)`. `metrics` has `loss`, `time_s` (wall
    seconds of each iteration) and `nfe` (one value per iteration), `memory_bytes`,
    `compile_s`, `iterations`, `config` and the entries of `metadata`.

    **Raises:**

    Before anything is computed:

    - `neuralode.CheckpointError` if `out_dir` cannot be written; on resume if the
        checkpoint is missing, corrupt or was written with a different `config`;
        without `resume` or `overwrite` if `out_dir` already holds a checkpoint.
        Nothing is written then.

    When training stops early, after checkpointing the last good state (its iteration
    is `metrics["iterations"]`; `metrics["stopped"]` says why):

    - `neuralode.TrainingDiverged` if the loss or the updated parameters are not finite;
    - `neuralode.TrainingStopped` if a step fails at run time (for example a
        `diffrax.diffeqsolve` that reaches `max_steps`);
    - `KeyboardInterrupt` on Ctrl-C or SIGTERM (when `fit` runs in the main thread,
        the first signal stops training after the current iteration, a second at
        once).
    """
    niters = as_int("fit", "niters", niters)
    checkpoint_every = as_int("fit", "checkpoint_every", checkpoint_every)
    config = _jsonable(config or {})
    metadata = _jsonable(metadata or {})
    check_output_dir(out_dir, resume=resume, overwrite=overwrite)
    os.makedirs(out_dir, exist_ok=True)
    checkpoint_path = os.path.join(out_dir, CHECKPOINT_NAME)
    metrics_path = os.path.join(out_dir, METRICS_NAME)
    if not resume and os.path.exists(checkpoint_path):
        os.remove(checkpoint_path)  # overwrite: the old run must not be resumed later

    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt_state = optimiser.init(params)
    history = {"loss": [], "time_s": [], "nfe": []}
    start = 0
    if resume:
        (params, opt_state, key), start, history, saved_config = _load_checkpoint(
            checkpoint_path, (params, opt_state, key), config, may_change
        )
        changed = [
            f"{k} {saved_config.get(k)!r} -> {config.get(k)!r}"
            for k in sorted(may_change)
            if saved_config.get(k) != config.get(k)
        ]
        if changed:
            print(f"{desc}: resuming at iteration {start} with {', '.join(changed)}.")

    def step(params, opt_state, key):
        key, batch_key = jax.random.split(key)
        batch = sample_batch(batch_key)

        def loss_of_params(params):
            return loss_fn(eqx.combine(params, static), batch)

        (loss, nfe), grads = jax.value_and_grad(loss_of_params, has_aux=True)(params)
        updates, opt_state = optimiser.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # Checked here so that parameters that went non-finite are never checkpointed.
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.stack(
                [jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves(params)]
            )
        )
        return params, opt_state, key, loss, nfe, finite

    # From here on, Ctrl-C or SIGTERM stops after an iteration (see `_StopRequests`).
    with _StopRequests() as stop:
        tic = time.perf_counter()
        compiled = jax.jit(step).lower(params, opt_state, key).compile()
        compile_s = time.perf_counter() - tic
        memory_bytes = int(compiled.memory_analysis().temp_size_in_bytes)

        def metrics(**extra):
            return {
                **metadata,
                **history,
                "iterations": len(history["loss"]),
                "memory_bytes": memory_bytes,
                "compile_s": compile_s,
                "config": config,
                **extra,
            }

        # The trained state and its iteration, replaced in one assignment, so that an
        # interrupt anywhere in the loop leaves a consistent pair to checkpoint.
        current = ((params, opt_state, key), start)
        saved = start  # the iteration of the checkpoint on disk
        bar = tqdm(total=niters, initial=start, desc=desc, disable=not progress)
        try:
            while current[1] < niters:
                state, done = current
                if stop.requested:
                    raise KeyboardInterrupt
                tic = time.perf_counter()
                try:
                    with _quiet_callback_failures():
                        new = compiled(*state)
                        loss, nfe, finite = float(new[3]), int(new[4]), bool(new[5])
                except jax.errors.JaxRuntimeError as e:
                    raise TrainingStopped(
                        f"iteration {done + 1} failed: {_runtime_message(e)}"
                    ) from None
                seconds = time.perf_counter() - tic
                if not finite:
                    raise TrainingDiverged(
                        f"non-finite loss or parameters at iteration {done + 1} "
                        f"(loss {loss}). Try a smaller --lr or smaller/adaptive steps; "
                        f"if the saved state is already too far gone, start afresh "
                        f"(--overwrite)."
                    )
                for name, value in (("loss", loss), ("time_s", seconds), ("nfe", nfe)):
                    history[name].append(value)
                current = (new[:3], done + 1)
                bar.set_postfix(
                    loss=f"{loss:.4g}", nfe=nfe, s_it=f"{seconds:.3g}", refresh=False
                )
                bar.update(1)
                if (done + 1) % checkpoint_every == 0 or done + 1 == niters:
                    save_checkpoint(checkpoint_path, *current, config, history)
                    saved = done + 1
                    save_metrics(metrics_path, metrics())
        except (TrainingStopped, KeyboardInterrupt) as e:
            stop.hold()  # a further Ctrl-C must not cut the checkpoint short
            bar.close()
            state, done = current
            for values in history.values():
                del values[done:]  # an interrupt may have come between the appends
            if done > saved:
                save_checkpoint(checkpoint_path, state, done, config, history)
            kept = (
                f"{checkpoint_path} holds the state after iteration {done}: continue "
                f"from there with --resume (`resume=True`)."
                if done
                else "Nothing was trained, so nothing was checkpointed."
            )
            if isinstance(e, KeyboardInterrupt):
                message = f"interrupted after iteration {done}. {kept}"
            else:
                message = f"{e} Training stopped. {kept}"
            save_metrics(metrics_path, metrics(stopped=message))
            raise type(e)(message) from None
        bar.close()
        (params, opt_state, key), _ = current
        if start >= niters and progress:
            print(
                f"{desc}: checkpoint is already at iteration {start} >= niters={niters}."
            )
        result = metrics()
        save_metrics(metrics_path, result)
        return TrainResult(eqx.combine(params, static), result)


def check_output_dir(
    out_dir: str | os.PathLike, *, resume: bool, overwrite: bool = False
) -> None:
    """What `neuralode.fit` checks before it computes anything: `out_dir` is, or can be
    created as, a writable directory; with `resume` it holds a checkpoint; without
    `resume` or `overwrite` it holds none, so that a run started afresh by mistake
    cannot replace a further-along one.

    **Raises:**

    `neuralode.CheckpointError`, saying which and what to do instead.
    """
    if not os.fspath(out_dir):
        raise CheckpointError("the output directory is empty: pass --out DIR.")
    path = os.path.join(out_dir, CHECKPOINT_NAME)
    if os.path.lexists(path) and not os.path.isfile(path):
        raise CheckpointError(
            f"{path} is not a file: remove it, or choose another output directory."
        )
    if resume:
        _read_checkpoint(path)  # exists and has a readable header
    elif os.path.lexists(path) and not overwrite:
        try:
            at = f" at iteration {_read_checkpoint(path)[0]['iteration']}"
        except CheckpointError:
            at = ""
        raise CheckpointError(
            f"{path} already holds a checkpoint{at}. Continue it with --resume "
            f"(`resume=True`), start afresh over it with --overwrite "
            f"(`overwrite=True`), or use another output directory."
        )
    # The nearest existing directory on the way must let us create what is missing.
    existing = os.path.abspath(out_dir)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    problem = (
        "is not a directory"
        if not os.path.isdir(existing)
        else "is not writable"
        if not os.access(existing, os.W_OK | os.X_OK)
        else None
    )
    if problem:
        raise CheckpointError(
            f"cannot write to the output directory {os.fspath(out_dir)!r}: {existing} "
            f"{problem}. Choose another with --out (`out_dir=`)."
        )


def checkpoint_config(path: str | os.PathLike) -> dict:
    """The `config` stored in the checkpoint at `path`."""
    return _read_checkpoint(path)[0].get("config") or {}


class _StopRequests:
    """Ctrl-C and SIGTERM while `fit` runs (from the main thread): the first asks the
    loop to stop after the current iteration, which then checkpoints; a second stops at
    once. A flag, not an exception raised anywhere: a `KeyboardInterrupt` can land
    inside a compile or a garbage-collection callback, and be lost there."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._request) for s in self.SIGNALS}
        return self

    def _request(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nstopping after this iteration (press Ctrl-C again to stop now)",
            file=sys.stderr,
        )

    def hold(self):
        if self.previous is not None:
            for s in self.SIGNALS:
                signal.signal(s, signal.SIG_IGN)

    def __exit__(self, *exc_info):
        if self.previous is not None:
            for s, handler in self.previous.items():
                signal.signal(s, handler)
            self.previous = None


class _quiet_callback_failures:
    """JAX logs the whole traceback of a host callback that raises (Equinox's runtime
    errors, e.g. Diffrax's `max_steps`) before the error itself arrives; `fit` reports
    that error in one line, so the log would only bury it."""

    logger = logging.getLogger("jax._src.callback")

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc_info):
        self.logger.setLevel(self.level)


def _runtime_message(error: Exception) -> str:
    # A runtime error raised inside a compiled step (e.g. Diffrax's "maximum number of
    # solver steps") arrives wrapped in XLA's callback traceback: keep its own line.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "Error: " in line and not line.startswith(("INTERNAL", "File ")):
            return line.split("Error: ", 1)[1]
    return lines[0] if lines else type(error).__name__


def save_checkpoint(
    path: str | os.PathLike,
    state: PyTree,
    iteration: int,
    config: dict,
    history: dict,
) -> None:
    """Write `state` (the arrays of a PyTree: parameters, optimiser state, key) with a
    JSON header (`iteration`, `config`, `history`) to `path`, atomically: a temporary
    file in the same directory is written, flushed and then renamed over `path`, so that
    `path` always holds a complete checkpoint."""
    header = {"iteration": iteration, "config": config, "history": history}
    buffer = io.BytesIO()
    buffer.write(_MAGIC)
    buffer.write(json.dumps(header).encode() + b"\n")
    eqx.tree_serialise_leaves(buffer, state)
    _write_atomic(path, buffer.getvalue())


def load_checkpoint(
    path: str | os.PathLike,
    like: PyTree,
    config: dict | None = None,
    may_change: Collection[str] = (),
) -> tuple[PyTree, int, dict]:
    """Read a checkpoint written by `neuralode.save_checkpoint`.

    **Arguments:**

    - `path`: the checkpoint file.
    - `like`: a PyTree with the structure, shapes and dtypes of the saved state.
    - `config`: if given, the checkpoint's `config` must equal it, but for the keys in
        `may_change`.

    **Returns:**

    `(state, iteration, history)`.

    **Raises:**

    `neuralode.CheckpointError` if the file is missing, corrupt, was written with
    another `config`, or does not match `like`.
    """
    return _load_checkpoint(path, like, config, may_change)[:3]


def _load_checkpoint(path, like, config, may_change):
    """`load_checkpoint`'s result and the checkpoint's `config`."""
    header, stream = _read_checkpoint(path)
    saved_config = header.get("config") or {}
    iteration, history = header["iteration"], header["history"]
    if config is not None:
        keys = sorted(
            k
            for k in set(saved_config) | set(config)
            if saved_config.get(k) != config.get(k) and k not in may_change
        )
        if keys:
            details = ", ".join(
                f"{k}: checkpoint {saved_config.get(k)!r} vs now {config.get(k)!r}"
                for k in keys
            )
            raise CheckpointError(
                f"{path} was written by a different configuration ({details}). Use "
                f"the same options to resume, or start afresh with --overwrite "
                f"(`overwrite=True`) or in another output directory."
            )
    try:
        state = eqx.tree_deserialise_leaves(stream, like)
        trailing = stream.read()
    except Exception as e:  # numpy raises several types on truncated data
        raise CheckpointError(f"{path} is corrupt: {type(e).__name__}: {e}") from None
    if trailing:
        raise CheckpointError(
            f"{path} is corrupt or does not match the model: extra data."
        )
    for saved, want in zip(
        jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(like), strict=True
    ):
        if np.shape(saved) != np.shape(want) or jnp.result_type(
            saved
        ) != jnp.result_type(want):
            raise CheckpointError(
                f"{path} does not match the model: an array of shape {np.shape(saved)} "
                f"and dtype {jnp.result_type(saved)} where {np.shape(want)} and "
                f"{jnp.result_type(want)} were expected."
            )
    return state, iteration, history, saved_config


def _read_checkpoint(path: str | os.PathLike) -> tuple[dict, io.BytesIO]:
    """The checked header of the checkpoint at `path` (`iteration`, `config`,
    `history`) and a stream positioned at its arrays."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is not a file" if os.path.lexists(path) else "does not exist"
        raise CheckpointError(f"no checkpoint to resume from: {path} {what}.")
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(_MAGIC):
        raise CheckpointError(f"{path} is not a neuralode checkpoint (bad header).")
    stream = io.BytesIO(data)
    stream.seek(len(_MAGIC))
    try:
        header = json.loads(stream.readline())
        header["iteration"] = int(header["iteration"])
        header["history"] = {
            k: list(header["history"][k]) for k in ("loss", "time_s", "nfe")
        }
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt: unreadable header ({e}).") from None
    if any(len(v) != header["iteration"] for v in header["history"].values()):
        raise CheckpointError(f"{path} is corrupt: history does not match iteration.")
    return header, stream


def save_metrics(path: str | os.PathLike, metrics: dict) -> None:
    """Write `metrics` as JSON to `path`, atomically (temporary file, then rename)."""
    _write_atomic(path, (json.dumps(_jsonable(metrics), indent=1) + "\n").encode())


def plot_loss(metrics: dict, path: str | os.PathLike, *, title: str = "") -> None:
    """Save a PNG of the training loss per iteration (log scale) to `path`.

    Needs matplotlib (`pip install neuralode[examples]`); uses the Agg backend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=90)
    losses = metrics["loss"]
    ax.plot(
        np.arange(1, len(losses) + 1),
        losses,
        lw=1,
        marker="o" if len(losses) < 2 else None,
    )
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title or f"training loss ({metrics.get('adjoint', '')})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write_atomic(path: str | os.PathLike, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
    try:
        # mkstemp's 0600 would hide the results from others.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: setting it is process-wide


def _jsonable(tree):
    # JSON round-trip: tuples become lists and numpy scalars Python numbers, so a config
    # compares equal to the one read back from a checkpoint.
    def default(x):
        if isinstance(x, (np.generic, np.ndarray, jax.Array)):
            return np.asarray(x).tolist()
        raise TypeError(f"not JSON-serialisable: {type(x).__name__}")

    return json.loads(json.dumps(tree, default=default))
