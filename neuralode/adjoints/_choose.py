"""`choose_adjoint`: the gradient strategy with the least estimated work that fits in a
memory budget.

Each candidate's gradient is compiled and its memory read from XLA's static analysis
(arguments, outputs and temporaries of the compiled program: deterministic, on CPU and
GPU alike). Its time is estimated by counting evaluations of the vector field f, for the
number of steps the solve actually takes (found by running it once):

- the forward solve: one evaluation per stage of each attempted step, m·s;
- `backprop`: the forward solve, then one VJP per evaluation from stored activations
  (a VJP costs about two evaluations): 3·m·s;
- `symplectic`: the forward solve, each accepted step recomputed R times in all (R = n
  with every step kept; with c checkpoints, Griewank & Walther's count of the forward
  steps of binomial checkpointing, R = t·n − C(c + t, t − 1) for the least t with
  C(c + t, t) ≥ n), and one VJP per stage that recomputes its evaluation (3 evaluations):
  m·s + (R·m/n)·s + 3·n·s; with `step_activations=True` the VJP of each step does its
  last recomputation: m·s + ((R − n)·m/n)·s + 3·n·s;
- `continuous`: the forward solve, and a backward solve of y and the adjoint together,
  assumed to take as many steps: m·s + 4·m·s.

These are estimates of arithmetic, not timings: memory traffic (which dominates
full-storage backprop on a CPU) is not counted.
"""

import functools as ft
import math
import re
from collections.abc import Callable
from typing import NamedTuple

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import numpy as np

from . import _diffrax_private as private
from ._backprop import BackpropAdjoint
from ._continuous import ContinuousAdjoint
from ._symplectic import SymplecticAdjoint
from ._symplectic._schedule import default_checkpoints
from ._symplectic._tableau import explicit_tableau


class Candidate(NamedTuple):
    """One row of `Choice.table`."""

    name: str
    adjoint: diffrax.AbstractAdjoint
    bytes: int
    evaluations: int
    fits: bool


class Choice(NamedTuple):
    """What `choose_adjoint` returns: the chosen `adjoint` and its `name`, the `budget`
    in bytes, and the `table` of every candidate. `print(choice)` shows the table."""

    adjoint: diffrax.AbstractAdjoint
    name: str
    budget: int
    table: tuple[Candidate, ...]

    def __str__(self) -> str:
        lines = [
            f"memory budget {_format_bytes(self.budget)}; chosen: {self.name}",
            f"{'candidate':<28} {'memory (XLA)':>14} {'evaluations of f':>17}  fits",
        ]
        for row in self.table:
            mark = "yes" if row.fits else "no"
            lines.append(
                f"{row.name:<28} {_format_bytes(row.bytes):>14} "
                f"{row.evaluations:>17,}  {mark}"
            )
        return "\n".join(lines)


def choose_adjoint(
    loss_fn: Callable[..., jax.Array],
    *args,
    memory_budget: int | float | str,
    exact: bool = True,
) -> Choice:
    """The gradient strategy with the least estimated work (evaluations of f) whose
    compiled gradient fits in `memory_budget`.

    **Arguments:**

    - `loss_fn`: called as `loss_fn(adjoint, *args)`; returns a scalar and passes
        `adjoint` to its `diffrax.diffeqsolve` (every solve in it, if several).
    - `args`: its other arguments. The gradient is taken with respect to their
        floating-point arrays (as `equinox.filter_grad` does), so they may hold Equinox
        modules.
    - `memory_budget`: bytes, as an int or a string such as `"2GiB"` or `"500MB"`, or
        a fraction in (0, 1] of the first device's memory where the backend reports it.
    - `exact`: consider only the exact strategies (`backprop`, `symplectic` with every
        step kept or with fewer checkpoints). With `exact=False`, `continuous` too.

    **Returns:**

    A `Choice`: `.adjoint` (pass it to your solve), `.name`, and `.table`, every
    candidate with its memory in bytes, its estimated evaluations of f (see the module
    documentation), and whether it fits. `print(choice)` shows the table. The same
    inputs give the same choice.

    **Raises:**

    `ValueError` if no candidate fits, naming the smallest memory any needs.

    ```python
    def loss_fn(adjoint, model, y0):
        sol = diffrax.diffeqsolve(..., y0=y0, adjoint=adjoint, max_steps=4096)
        return jnp.mean(sol.ys**2)

    choice = neuralode.choose_adjoint(loss_fn, model, y0, memory_budget="2GiB")
    print(choice)
    ```
    """
    budget = _budget_bytes(memory_budget)
    solve = _probe(loss_fn, args)
    table = []
    for name, adjoint in _candidates(solve, exact):
        needed = _gradient_bytes(loss_fn, adjoint, args)
        evaluations = _evaluations(name, adjoint, solve)
        table.append(Candidate(name, adjoint, needed, evaluations, needed <= budget))
    fitting = [row for row in table if row.fits]
    if not fitting:
        smallest = min(table, key=lambda row: row.bytes)
        raise ValueError(
            f"choose_adjoint: no gradient strategy fits in {_format_bytes(budget)}; "
            f"the smallest need is {_format_bytes(smallest.bytes)}, by "
            f"{smallest.name}. Raise `memory_budget`, or use fewer steps or a smaller "
            "batch."
        )
    best = min(fitting, key=lambda row: row.evaluations)  # first of equals
    return Choice(best.adjoint, best.name, budget, tuple(table))


class _Solve(NamedTuple):
    """What one run of the loss shows about its solves (the largest over them)."""

    accepted: int  # n
    attempted: int  # m
    stages: int  # s
    max_steps: int | None


class _Probe(diffrax.AbstractAdjoint):
    """Solves as Diffrax's default adjoint does when not differentiated, and reports
    each solve's steps and stages."""

    report: Callable = eqx.field(static=True)

    def loop(
        self,
        *,
        solver,
        max_steps,
        throw,
        passed_solver_state,
        passed_controller_state,
        **kwargs,
    ):
        del throw, passed_solver_state, passed_controller_state
        tableau = explicit_tableau(solver)
        stages = 1 if tableau is None else tableau.num_stages
        final_state, aux_stats = private.loop(
            solver=solver,
            max_steps=max_steps,
            inner_while_loop=_LAX_WHILE_LOOP,
            outer_while_loop=_LAX_WHILE_LOOP,
            **kwargs,
        )
        jax.debug.callback(
            lambda n, m: self.report(n, m, stages, max_steps),
            final_state.num_accepted_steps,
            final_state.num_steps,
        )
        return final_state, aux_stats


_LAX_WHILE_LOOP = ft.partial(eqxi.while_loop, kind="lax")


def _probe(loss_fn, args) -> _Solve:
    seen = []

    def report(n, m, stages, max_steps):
        seen.append((int(np.max(n)), int(np.max(m)), stages, max_steps))

    dynamic, static = eqx.partition(args, eqx.is_array)
    run = jax.jit(lambda d: loss_fn(_Probe(report), *eqx.combine(d, static)))
    jax.block_until_ready(run(dynamic))
    if not seen:
        raise ValueError(
            "choose_adjoint: `loss_fn(adjoint, *args)` must pass `adjoint` to its "
            "`diffrax.diffeqsolve(..., adjoint=adjoint)`; it solved nothing with it."
        )
    accepted = max(max(row[0] for row in seen), 1)
    attempted = max(max(row[1] for row in seen), accepted)
    max_steps = [row[3] for row in seen]
    return _Solve(
        accepted,
        attempted,
        max(row[2] for row in seen),
        None if None in max_steps else max(max_steps),
    )


def _candidates(solve: _Solve, exact: bool):
    """Backprop, symplectic with every step kept (also with each step's activations),
    and symplectic over a ladder of checkpoints: Diffrax's default number, and powers
    of two below the steps taken."""
    yield "backprop", BackpropAdjoint()
    yield (
        "symplectic (every step, step activations)",
        SymplecticAdjoint(checkpoints="all", step_activations=True),
    )
    yield "symplectic (every step)", SymplecticAdjoint(checkpoints="all")
    ladder = set()
    if solve.max_steps is not None:
        ladder.add(default_checkpoints(solve.max_steps))
    c = 1
    while c < solve.accepted:
        ladder.add(c)
        c *= 2
    for c in sorted(ladder, reverse=True):
        if solve.max_steps is None or c < solve.max_steps:
            yield f"symplectic (checkpoints={c})", SymplecticAdjoint(checkpoints=c)
    if not exact:
        yield "continuous", ContinuousAdjoint()


_MEMORY: dict = {}  # XLA's figures by (loss_fn, adjoint, argument shapes): compiled once


def _gradient_bytes(loss_fn, adjoint, args) -> int:
    """Arguments, outputs and temporaries of the compiled gradient, from XLA."""
    dynamic, static = eqx.partition(args, eqx.is_array)
    leaves, treedef = jax.tree_util.tree_flatten(dynamic)
    shapes = tuple((x.shape, x.dtype) for x in leaves)
    key = (loss_fn, adjoint, treedef, shapes, static)
    try:
        return _MEMORY[key]
    except TypeError:  # something unhashable among the static arguments
        key = None
    except KeyError:
        pass

    def grad(dynamic):
        inexact, other = eqx.partition(dynamic, eqx.is_inexact_array)
        loss = lambda x: loss_fn(adjoint, *eqx.combine(x, other, static))
        return jax.grad(loss)(inexact)

    memory = jax.jit(grad).lower(dynamic).compile().memory_analysis()
    if memory is None:
        raise ValueError(
            f"choose_adjoint: the {jax.devices()[0].platform} backend gives no memory "
            "analysis of a compiled program, which the choice rests on."
        )
    needed = int(
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    if key is not None:
        _MEMORY[key] = needed
    return needed


def _evaluations(name: str, adjoint, solve: _Solve) -> int:
    """Estimated evaluations of f for one gradient (see the module docstring)."""
    n, m, s = solve.accepted, solve.attempted, solve.stages
    forward = m * s
    if name == "backprop":
        return 3 * forward
    if name == "continuous":
        return 5 * forward
    slots = adjoint.checkpoints
    recomputed = n if slots == "all" else _forward_steps(n, slots)
    if adjoint.step_activations:
        recomputed -= n  # each step's VJP recomputes it
    return forward + math.ceil(recomputed * m / n) * s + 3 * n * s


def _forward_steps(n: int, c: int) -> int:
    """Forward steps binomial checkpointing with c checkpoints takes to reverse n
    steps, each step's own recomputation included (Griewank & Walther 2000)."""
    t = 1
    while math.comb(c + t, t) < n:
        t += 1
    return max(t * n - math.comb(c + t, t - 1), n)


_UNITS = {"": 1, "B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def _budget_bytes(budget) -> int:
    if isinstance(budget, bool):
        raise ValueError(f"choose_adjoint: `memory_budget` got {budget!r}.")
    if isinstance(budget, int):
        if budget <= 0:
            raise ValueError(
                f"choose_adjoint: `memory_budget` must be positive, got {budget}."
            )
        return budget
    if isinstance(budget, float):
        return _fraction_of_device(budget)
    if isinstance(budget, str):
        match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", budget, re.I)
        if match is not None:
            number, prefix, binary = match.groups()
            scale = _UNITS[prefix.upper()]
            if binary:
                scale = 1024 ** "BKMGT".index(prefix.upper() or "B")
            return _budget_bytes(int(float(number) * scale))
    raise ValueError(
        "choose_adjoint: `memory_budget` must be bytes (an int, or a string such as "
        "'2GiB' or '500MB') or a fraction of the device's memory (a float in (0, 1]); "
        f"got {budget!r}."
    )


def _fraction_of_device(fraction: float) -> int:
    if not 0 < fraction <= 1:
        raise ValueError(
            "choose_adjoint: a float `memory_budget` is a fraction of the device's "
            f"memory, in (0, 1]; got {fraction}."
        )
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        raise ValueError(
            f"choose_adjoint: the {jax.devices()[0].platform} backend does not report "
            "its memory, so a fractional `memory_budget` cannot be converted; pass "
            "bytes, e.g. memory_budget='2GiB'."
        )
    return int(fraction * stats["bytes_limit"])


def _format_bytes(num: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num) < 1024 or unit == "GiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    raise AssertionError  # unreachable
