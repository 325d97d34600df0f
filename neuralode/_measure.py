"""Measuring a gradient strategy: memory (XLA's static figure and the device peak),
gradient error, and time."""

import time
from collections.abc import Callable

import equinox as eqx
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
    process. It counts the allocator's chunks, so keep the pool preallocated (JAX's
    default; `XLA_PYTHON_CLIENT_MEM_FRACTION` sizes it): grown on demand
    (`XLA_PYTHON_CLIENT_PREALLOCATE=false`), a buffer can count as the whole region
    grown for it, up to the next power of two."""
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
    num = sum(
        float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
        for a, b in zip(est, ref, strict=False)
    )
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


class EvaluationCounter:
    """Counts, at run time, how often a vector field is evaluated.

    `counter.wrap(field)` returns a field with the same signature and parameters that
    reports each evaluation through `jax.debug.callback`; `counter.count` is the number of
    evaluations executed since the last `counter.reset()`. Count the primal solve and the
    gradient separately: evaluations of the backward pass are the difference.

    The callback takes the state as an operand so that it runs where the evaluation runs
    (inside loops, checkpointed recomputations and VJPs) and is not moved out of them.
    It counts evaluations as traced: XLA can no longer merge two identical evaluations,
    which it might do without the callback. Do not time a counted function.

    ```python
    counter = neuralode.EvaluationCounter()
    term = diffrax.ODETerm(counter.wrap(field))
    ```
    """

    def __init__(self):
        self.count = 0

    def reset(self) -> None:
        self.count = 0

    def _increment(self, *operands) -> None:
        del operands
        self.count += 1

    def wrap(self, field: Callable) -> "_CountedField":
        return _CountedField(field, self)


class _CountedField(eqx.Module):
    field: Callable
    counter: EvaluationCounter = eqx.field(static=True)

    def __call__(self, t, y, args):
        jax.debug.callback(self.counter._increment, y)
        return self.field(t, y, args)


def fit_exponent(xs, ys) -> float:
    """The exponent p of a least-squares fit ys ≈ c·xs^p on log-log axes (`nan` with fewer
    than two usable points; non-positive values are dropped)."""
    pairs = [
        (float(x), float(y))
        for x, y in zip(xs, ys, strict=False)
        if x is not None and y is not None and x > 0 and y > 0
    ]
    if len({x for x, _ in pairs}) < 2:
        return float("nan")
    lx, ly = np.log([x for x, _ in pairs]), np.log([y for _, y in pairs])
    return float(np.polyfit(lx, ly, 1)[0])


def fit_increment(xs, ys) -> float:
    """The slope a of a least-squares line ys ≈ a·xs + b (e.g. bytes per step); `nan`
    with fewer than two distinct xs."""
    pairs = [
        (float(x), float(y))
        for x, y in zip(xs, ys, strict=False)
        if x is not None and y is not None
    ]
    if len({x for x, _ in pairs}) < 2:
        return float("nan")
    return float(np.polyfit([x for x, _ in pairs], [y for _, y in pairs], 1)[0])


__all__ = [
    "xla_temp_bytes",
    "peak_memory_bytes",
    "relative_error",
    "median_time_ms",
    "EvaluationCounter",
    "fit_exponent",
    "fit_increment",
]
