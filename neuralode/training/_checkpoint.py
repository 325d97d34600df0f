"""Checkpoints: a training state and the run's record, written atomically, read back
exactly, and checked against the run that wants to resume from them.

A checkpoint file is a magic line, one line of JSON (`iteration`, `config`, `history`)
and the state's arrays as `equinox.tree_serialise_leaves` writes them. `history` maps
each recorded metric to one value per iteration; which metrics there are is up to the
run that wrote it.
"""

import dataclasses
import io
import json
import os
import tempfile
from collections.abc import Collection
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

_MAGIC = b"NEURALODE-CHECKPOINT 1\n"

Path = str | os.PathLike[str]


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, belongs to a different configuration, would be
    overwritten, or cannot be written."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A training state after `iteration` iterations, with the run's `config` and the
    `history` of its metrics (one value per iteration each).

    **Arguments:**

    - `state`: a PyTree of arrays, e.g. a `neuralode.training.TrainState`.
    - `iteration`: the number of iterations the state has been trained for.
    - `config`: a JSON-serialisable dict of what defines the run, compared on resume.
    - `history`: `{metric name: [one value per iteration]}`.
    """

    state: PyTree
    iteration: int
    config: dict[str, Any]
    history: dict[str, list[Any]]

    def save(self, path: Path) -> None:
        """Write the checkpoint to `path`, atomically: a temporary file in the same
        directory is written, flushed and then renamed over `path`, so that `path`
        always holds a complete checkpoint."""
        header = {
            "iteration": self.iteration,
            "config": self.config,
            "history": self.history,
        }
        buffer = io.BytesIO()
        buffer.write(_MAGIC)
        buffer.write(json.dumps(header).encode() + b"\n")
        eqx.tree_serialise_leaves(buffer, self.state)
        write_atomic(path, buffer.getvalue())

    @classmethod
    def load(
        cls,
        path: Path,
        like: PyTree,
        config: dict[str, Any] | None = None,
        may_change: Collection[str] = (),
    ) -> "Checkpoint":
        """Read the checkpoint at `path`.

        **Arguments:**

        - `path`: the checkpoint file.
        - `like`: a PyTree with the structure, shapes and dtypes of the saved state.
        - `config`: if given, the checkpoint's `config` must equal it, but for the keys
            in `may_change`.

        **Raises:**

        `neuralode.training.CheckpointError` if the file is missing, corrupt, was
        written with another `config`, or does not match `like`.
        """
        header, stream = _read(path)
        saved_config = header.get("config") or {}
        if config is not None:
            _check_config(path, saved_config, config, may_change)
        try:
            state = eqx.tree_deserialise_leaves(stream, like)
            trailing = stream.read()
        except Exception as e:  # numpy raises several types on truncated data
            raise CheckpointError(
                f"{path} is corrupt: {type(e).__name__}: {e}"
            ) from None
        if trailing:
            raise CheckpointError(
                f"{path} is corrupt or does not match the model: extra data."
            )
        for saved, want in zip(
            jax.tree_util.tree_leaves(state),
            jax.tree_util.tree_leaves(like),
            strict=True,
        ):
            shape, dtype = np.shape(saved), jnp.result_type(saved)
            if shape != np.shape(want) or dtype != jnp.result_type(want):
                raise CheckpointError(
                    f"{path} does not match the model: an array of shape {shape} and "
                    f"dtype {dtype} where {np.shape(want)} and {jnp.result_type(want)} "
                    f"were expected."
                )
        return cls(state, header["iteration"], saved_config, header["history"])

    @staticmethod
    def read_config(path: Path) -> dict[str, Any]:
        """The `config` stored in the checkpoint at `path`, without reading its arrays.

        **Raises:**

        `neuralode.training.CheckpointError` if there is no readable checkpoint.
        """
        return _read(path)[0].get("config") or {}

    @staticmethod
    def read_iteration(path: Path) -> int:
        """The `iteration` of the checkpoint at `path`, without reading its arrays."""
        return _read(path)[0]["iteration"]


def check_output_dir(out_dir: Path, *, resume: bool, overwrite: bool = False) -> str:
    """What `neuralode.training.fit` checks before it computes anything: `out_dir` is, or
    can be created as, a writable directory; with `resume` it holds a checkpoint named
    `checkpoint.eqx`; without `resume` or `overwrite` it holds none, so that a run
    started afresh by mistake cannot replace a further-along one.

    **Returns:**

    The checkpoint's path, `out_dir/checkpoint.eqx`.

    **Raises:**

    `neuralode.training.CheckpointError`, saying which and what to do instead.
    """
    if not os.fspath(out_dir):
        raise CheckpointError("`out_dir` is empty: pass the output directory.")
    path = os.path.join(out_dir, "checkpoint.eqx")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise CheckpointError(
            f"{path} is not a file: remove it, or choose another output directory."
        )
    if resume:
        _read(path)  # exists and has a readable header
    elif os.path.lexists(path) and not overwrite:
        try:
            at = f" at iteration {Checkpoint.read_iteration(path)}"
        except CheckpointError:
            at = ""
        raise CheckpointError(
            f"{path} already holds a checkpoint{at}. Continue it with `resume=True`, "
            f"start afresh over it with `overwrite=True`, or use another output "
            f"directory."
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
            f"{problem}. Choose another `out_dir`."
        )
    return path


def _check_config(
    path: Path,
    saved: dict[str, Any],
    config: dict[str, Any],
    may_change: Collection[str],
) -> None:
    keys = sorted(
        k
        for k in set(saved) | set(config)
        if saved.get(k) != config.get(k) and k not in may_change
    )
    if keys:
        details = ", ".join(
            f"{k}: checkpoint {saved.get(k)!r} vs now {config.get(k)!r}" for k in keys
        )
        raise CheckpointError(
            f"{path} was written by a different configuration ({details}). Use the "
            f"same configuration to resume, or start afresh with `overwrite=True` or "
            f"in another output directory."
        )


def _read(path: Path) -> tuple[dict[str, Any], io.BytesIO]:
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
        header["history"] = {str(k): list(v) for k, v in header["history"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is corrupt: unreadable header ({e}).") from None
    if any(len(v) != header["iteration"] for v in header["history"].values()):
        raise CheckpointError(f"{path} is corrupt: history does not match iteration.")
    return header, stream


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory, renamed
    over `path` once flushed to disk."""
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
