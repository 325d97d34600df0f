"""Measuring a gradient strategy: memory (XLA's static figure and the device peak),
gradient error, and time."""

import time
from collections.abc import Callable

import jax
import numpy as np


def xla_temp_bytes(fn: Callable, *args, **kwargs) -> int:
    """Bytes of temporary buffers XLA allocates for `jax.jit(fn)(*args, **kwargs)`.

    Static (read from the compiled program, nothing is run) and deterministic, on CPU and
    GPU alike: the figure tests compare. Inputs and outputs are not included.
    """
    compiled = jax.jit(fn).lower(*args, **kwargs).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def peak_memory_bytes(device: jax.Device | None = None) -> int | None:
    """The device's peak bytes in use so far in this process, or `None` where the backend
    does not report it (CPU). The peak never goes down: measure one configuration per
    process, with `XLA_PYTHON_CLIENT_PREALLOCATE=false`."""
    device = jax.devices()[0] if device is None else device
    stats = device.memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def relative_error(estimate, reference) -> float:
    """‖estimate − reference‖ / ‖reference‖ over all leaves of two PyTrees, in float64."""
    est = jax.tree_util.tree_leaves(estimate)
    ref = jax.tree_util.tree_leaves(reference)
    if len(est) != len(ref):
        raise ValueError(f"relative_error: {len(est)} leaves against {len(ref)}.")
    num = sum(float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
              for a, b in zip(est, ref))
    den = sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for b in ref)
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def median_time_ms(fn: Callable, *args, repeats: int = 5) -> float:
    """Median wall time of `fn(*args)` in milliseconds over `repeats` runs, after one
    warm-up call (compilation), each run waited on with `block_until_ready`."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


__all__ = ["xla_temp_bytes", "peak_memory_bytes", "relative_error", "median_time_ms"]
