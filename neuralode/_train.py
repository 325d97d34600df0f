"""The training loop the examples share: a jitted optax step, a progress bar, metrics,
atomic checkpoints that a run can resume from exactly, and a stop on a non-finite loss.

Everything random in a step (the minibatch, Hutchinson noise) is drawn inside the jitted
step from a key that the step splits and returns. The key is part of the checkpoint, so
a resumed run draws the same batches as an uninterrupted one and gives the same losses.
"""

import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, PRNGKeyArray, PyTree
from tqdm.auto import tqdm

CHECKPOINT_NAME = "checkpoint.eqx"
METRICS_NAME = "metrics.json"
_MAGIC = b"NEURALODE-CHECKPOINT 1\n"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or belongs to a different configuration."""


class TrainingDiverged(RuntimeError):
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
    metadata: dict | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
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
    - `optimiser`: an `optax.GradientTransformation`.
    - `sample_batch`: `sample_batch(key) -> batch`, traceable by JAX.
    - `niters`: the total number of iterations, counting those of a resumed run.
    - `key`: a `jax.random.PRNGKey`; the first batch is drawn from it. Ignored on resume
        (the checkpoint's key is used).
    - `out_dir`: the directory for `metrics.json` and `checkpoint.eqx` (created).
    - `config`: a JSON-serialisable dict of everything that must be the same for a run
        to be resumed (model sizes, data, solver, learning rate, ...). It is stored in
        the checkpoint and compared on resume.
    - `metadata`: extra JSON-serialisable entries for `metrics.json` (e.g. `adjoint`).
    - `checkpoint_every`: write a checkpoint every this many iterations, and at the end.
    - `resume`: continue from `out_dir/checkpoint.eqx`.
    - `progress`: show the progress bar.
    - `desc`: the progress bar's label.

    **Returns:**

    A `neuralode.TrainResult` `(model, metrics)`. `metrics` has `loss`, `time_s` (wall
    seconds of each iteration) and `nfe` (one value per iteration), `memory_bytes`,
    `compile_s`, `iterations`, `config` and the entries of `metadata`.

    **Raises:**

    - `neuralode.CheckpointError` on resume if the checkpoint is missing, corrupt or was
        written with a different `config`; nothing is written then.
    - `neuralode.TrainingDiverged` if the loss or the updated parameters are not finite.
        Training stops there; `metrics.json` records the iterations before it, and the
        checkpoint on disk is the last one with finite parameters.
    """
    if not (isinstance(niters, int) and niters >= 1):
        raise ValueError(f"fit: `niters` must be a positive int, got {niters!r}.")
    if not (isinstance(checkpoint_every, int) and checkpoint_every >= 1):
        raise ValueError(
            f"fit: `checkpoint_every` must be a positive int, got {checkpoint_every!r}."
        )
    config = _jsonable(config or {})
    metadata = _jsonable(metadata or {})
    os.makedirs(out_dir, exist_ok=True)
    checkpoint_path = os.path.join(out_dir, CHECKPOINT_NAME)
    metrics_path = os.path.join(out_dir, METRICS_NAME)

    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt_state = optimiser.init(params)
    history = {"loss": [], "time_s": [], "nfe": []}
    start = 0
    if resume:
        (params, opt_state, key), start, history = load_checkpoint(
            checkpoint_path, (params, opt_state, key), config
        )

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

    def checkpoint(iteration):
        save_checkpoint(
            checkpoint_path, (params, opt_state, key), iteration, config, history
        )

    bar = tqdm(
        range(start, niters),
        initial=start,
        total=niters,
        desc=desc,
        disable=not progress,
    )
    for iteration in bar:
        tic = time.perf_counter()
        new = compiled(params, opt_state, key)
        loss, nfe, finite = float(new[3]), int(new[4]), bool(new[5])
        seconds = time.perf_counter() - tic
        if not finite:
            bar.close()
            message = (
                f"non-finite loss or parameters at iteration {iteration} "
                f"(loss {loss}); "
                f"training stopped. The last good checkpoint, if any, is kept in "
                f"{checkpoint_path}. Try a smaller --lr or smaller/adaptive steps."
            )
            save_metrics(metrics_path, metrics(stopped=message))
            raise TrainingDiverged(message)
        params, opt_state, key = new[:3]
        history["loss"].append(loss)
        history["time_s"].append(seconds)
        history["nfe"].append(nfe)
        bar.set_postfix(
            loss=f"{loss:.4g}", nfe=nfe, s_it=f"{seconds:.3g}", refresh=False
        )
        done = iteration + 1
        if done % checkpoint_every == 0 or done == niters:
            checkpoint(done)
            save_metrics(metrics_path, metrics())
    bar.close()
    if start >= niters and progress:
        print(f"{desc}: checkpoint is already at iteration {start} >= niters={niters}.")
    result = metrics()
    save_metrics(metrics_path, result)
    return TrainResult(eqx.combine(params, static), result)


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
    path: str | os.PathLike, like: PyTree, config: dict | None = None
) -> tuple[PyTree, int, dict]:
    """Read a checkpoint written by `neuralode.save_checkpoint`.

    **Arguments:**

    - `path`: the checkpoint file.
    - `like`: a PyTree with the structure, shapes and dtypes of the saved state.
    - `config`: if given, the checkpoint's `config` must equal it.

    **Returns:**

    `(state, iteration, history)`.

    **Raises:**

    `neuralode.CheckpointError` if the file is missing, corrupt, was written with
    another `config`, or does not match `like`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint to resume from: {path} does not exist.")
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(_MAGIC):
        raise CheckpointError(f"{path} is not a neuralode checkpoint (bad header).")
    stream = io.BytesIO(data)
    stream.seek(len(_MAGIC))
    try:
        header = json.loads(stream.readline())
        iteration = int(header["iteration"])
        history = {k: list(header["history"][k]) for k in ("loss", "time_s", "nfe")}
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt: unreadable header ({e}).") from None
    if config is not None and header.get("config") != config:
        saved = header.get("config") or {}
        keys = sorted(
            k for k in set(saved) | set(config) if saved.get(k) != config.get(k)
        )
        details = ", ".join(
            f"{k}: checkpoint {saved.get(k)!r} vs now {config.get(k)!r}" for k in keys
        )
        raise CheckpointError(
            f"{path} was written by a different configuration ({details}). Use the "
            f"same options to resume, or another output directory to start afresh."
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
    if not len(history["loss"]) == iteration:
        raise CheckpointError(f"{path} is corrupt: history does not match iteration.")
    return state, iteration, history


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
    ax.plot(np.arange(1, len(metrics["loss"]) + 1), metrics["loss"], lw=1)
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
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _jsonable(tree):
    # JSON round-trip: tuples become lists and numpy scalars Python numbers, so a config
    # compares equal to the one read back from a checkpoint.
    def default(x):
        if isinstance(x, (np.generic, np.ndarray, jax.Array)):
            return np.asarray(x).tolist()
        raise TypeError(f"not JSON-serialisable: {type(x).__name__}")

    return json.loads(json.dumps(tree, default=default))
