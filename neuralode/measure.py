"""Measuring a gradient strategy: memory (XLA's static figure and the device peak),
gradient error, time, and evaluations of the vector field.

Every function here takes PyTrees that may hold Equinox modules: arrays are traced,
everything else (activation functions, sizes) is held static, as `equinox.filter_jit`
does.

```python
import neuralode.measure as measure

bytes_ = measure.xla_temp_bytes(loss_grad, field, y0)   # field: an eqx.Module
```
"""

import time
from collections.abc import Callable, Iterable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.stages
import numpy as np
from jaxtyping import Array, ArrayLike, Int, PyTree

from .adjoints import Reversible

_Number = float | int | np.integer | np.floating


def xla_temp_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Bytes of temporary buffers XLA allocates for `fn(*args, **kwargs)`, compiled with
    `equinox.filter_jit`.

    Static (read from the compiled program, nothing is run) and deterministic, on CPU and
    GPU alike: the figure tests compare. Inputs and outputs are not included.

    **Arguments:**

    - `fn`: the function to compile, e.g. a gradient.
    - `args`, `kwargs`: its arguments: PyTrees of arrays, Equinox modules, and anything
        else (held static).

    **Returns:**

    `memory_analysis().temp_size_in_bytes` of the compiled program.
    """
    # `lower` is there at run time; filter_jit's annotation hides it.
    lowered = eqx.filter_jit(fn).lower(*args, **kwargs)  # pyright: ignore[reportFunctionMemberAccess]
    return compiled_temp_bytes(lowered.compile().compiled)


def compiled_temp_bytes(compiled: jax.stages.Compiled) -> int:
    """`xla_temp_bytes` of a program already compiled (`jax.jit(fn).lower(...).compile()`)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise RuntimeError("this JAX backend gives no memory analysis of its programs")
    return int(analysis.temp_size_in_bytes)


def compiled_total_bytes(compiled: jax.stages.Compiled) -> int:
    """XLA's arguments, outputs and temporaries of a program already compiled: the
    memory it needs in all, its inputs included."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise RuntimeError("this JAX backend gives no memory analysis of its programs")
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
    )


def peak_memory_bytes(
    device: jax.Device | None = None,  # pyright: ignore[reportInvalidTypeForm]
) -> int | None:
    """The device's peak bytes in use so far in this process, or `None` where the backend
    does not report it (CPU).

    The peak never goes down: measure one configuration per process. It counts the
    allocator's chunks, so keep the pool preallocated (JAX's default;
    `XLA_PYTHON_CLIENT_MEM_FRACTION` sizes it): grown on demand
    (`XLA_PYTHON_CLIENT_PREALLOCATE=false`), a buffer can count as the whole region
    grown for it, up to the next power of two.

    **Arguments:**

    - `device`: the device to ask; the first one by default.
    """
    stats = (jax.devices()[0] if device is None else device).memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def relative_error(estimate: PyTree, reference: PyTree) -> float:
    """‖estimate − reference‖ / ‖reference‖ over all array leaves of two PyTrees, in
    float64 (the plain norm of the difference where the reference is zero).

    **Arguments:**

    - `estimate`, `reference`: PyTrees of the same structure, e.g. two gradients with
        respect to an Equinox module; leaves that are not arrays are ignored.

    **Raises:**

    `ValueError` if the two hold different numbers of arrays.
    """
    est = jax.tree_util.tree_leaves(eqx.filter(estimate, eqx.is_array_like))
    ref = jax.tree_util.tree_leaves(eqx.filter(reference, eqx.is_array_like))
    if len(est) != len(ref):
        raise ValueError(
            f"relative_error: `estimate` has {len(est)} arrays, `reference` {len(ref)}."
        )
    num = sum(
        float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
        for a, b in zip(est, ref, strict=True)
    )
    den = sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for b in ref)
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def median_time_ms(fn: Callable[..., Any], *args: Any, repeats: int = 5) -> float:
    """Median wall time of `fn(*args)` in milliseconds over `repeats` runs, after one
    warm-up call (compilation), each run waited on with `jax.block_until_ready`.

    **Arguments:**

    - `fn`: the function to time, already jitted (e.g. with `equinox.filter_jit`).
    - `args`: its arguments (PyTrees, Equinox modules included).
    - `repeats`: the number of timed runs.
    """
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def function_evaluations(
    solver: diffrax.AbstractSolver, num_steps: Int[ArrayLike, "*batch"]
) -> Int[Array, "*batch"]:
    """Evaluations of the vector field that an explicit Runge--Kutta solve made in
    `num_steps` steps (accepted and rejected), as counted from
    `diffrax.Solution.stats["num_steps"]`.

    A step of an `s`-stage method costs `s` evaluations, or `s - 1` for a method whose
    last stage is the first stage of the next step (FSAL: Bosh3, Tsit5, Dopri5,
    Dopri8), which then costs one extra evaluation at the start. The count is that of
    the forward solve; a gradient strategy adds its own (e.g. the continuous adjoint's
    backward solve).

    **Arguments:**

    - `solver`: the Diffrax solver used: `diffrax.Euler`, an explicit Runge--Kutta
        solver (`diffrax.AbstractERK`), or `neuralode.Reversible` around one (two
        steps of it per step, each evaluating all `s` stages: `2·s`).
    - `num_steps`: `solution.stats["num_steps"]`.

    **Returns:**

    The number of evaluations, an integer array like `num_steps`.
    """
    num_steps = jnp.asarray(num_steps)
    if isinstance(solver, Reversible):
        return 2 * solver.base_tableau.num_stages * num_steps
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
    counter = neuralode.measure.EvaluationCounter()
    term = diffrax.ODETerm(counter.wrap(field))
    ```
    """

    def __init__(self) -> None:
        self.count = 0

    def reset(self) -> None:
        """Set the count to zero."""
        self.count = 0

    def _increment(self, *operands: Any) -> None:
        del operands
        self.count += 1

    def wrap(self, field: Callable[..., Any]) -> "_CountedField":
        """`field`, counted: an Equinox module called as `field(t, y, args)`."""
        return _CountedField(field, self)


class _CountedField(eqx.Module):
    field: Callable[..., Any]
    counter: EvaluationCounter = eqx.field(static=True)

    def __call__(self, t: ArrayLike, y: PyTree[Array], args: Any) -> PyTree[Array]:
        jax.debug.callback(self.counter._increment, y)
        return self.field(t, y, args)


def fit_exponent(xs: Iterable[_Number | None], ys: Iterable[_Number | None]) -> float:
    """The exponent p of a least-squares fit ys ≈ c·xs^p on log-log axes (`nan` with fewer
    than two usable points; missing and non-positive values are dropped)."""
    pairs = [
        (float(x), float(y))
        for x, y in zip(xs, ys, strict=False)
        if x is not None and y is not None and x > 0 and y > 0
    ]
    if len({x for x, _ in pairs}) < 2:
        return float("nan")
    lx, ly = np.log([x for x, _ in pairs]), np.log([y for _, y in pairs])
    return float(np.polyfit(lx, ly, 1)[0])


def fit_increment(xs: Iterable[_Number | None], ys: Iterable[_Number | None]) -> float:
    """The slope a of a least-squares line ys ≈ a·xs + b (e.g. bytes per step); `nan`
    with fewer than two distinct xs (missing values are dropped)."""
    pairs = [
        (float(x), float(y))
        for x, y in zip(xs, ys, strict=False)
        if x is not None and y is not None
    ]
    if len({x for x, _ in pairs}) < 2:
        return float("nan")
    return float(np.polyfit([x for x, _ in pairs], [y for _, y in pairs], 1)[0])


__all__ = [
    "EvaluationCounter",
    "fit_exponent",
    "fit_increment",
    "function_evaluations",
    "median_time_ms",
    "compiled_temp_bytes",
    "compiled_total_bytes",
    "peak_memory_bytes",
    "relative_error",
    "xla_temp_bytes",
]
