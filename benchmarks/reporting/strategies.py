"""The gradient strategies the report measures, by name: neuralode's own, Diffrax's
adjoints (its peers), torchdiffeq's, and checkpoint ladders of both exact families
(`symplectic_c8` = `SymplecticAdjoint(checkpoints=8)`, `diffrax_rca_c8` =
`RecursiveCheckpointAdjoint(checkpoints=8)`)."""

import re

CORE = ("backprop", "continuous", "symplectic")
# The adaptive sweep: `symplectic_default` is `SymplecticAdjoint()`, whose checkpoints
# follow the steps taken (`symplectic` keeps a state for each of `max_steps`).
ADAPTIVE = CORE + ("symplectic_default", "diffrax_rca")
PEERS = ("diffrax_rca", "diffrax_rca_n", "diffrax_direct", "diffrax_backsolve")
TORCH = ("torch_odeint", "torch_odeint_adjoint")
# Strategies of the gradient-error-vs-tolerance sweep.
TOLERANCE = ("continuous", "symplectic")
# Exact gradients of the discretised solve (the others solve an adjoint ODE backwards).
EXACT_FAMILIES = ("backprop", "symplectic", "diffrax_rca", "diffrax_direct")
LABEL = {
    "backprop": "backprop",
    "continuous": "continuous",
    "symplectic": 'SymplecticAdjoint(checkpoints="all")',
    "symplectic_default": "SymplecticAdjoint()",
    "diffrax_rca": "RecursiveCheckpointAdjoint()",
    "diffrax_rca_n": "RecursiveCheckpointAdjoint(checkpoints=n)",
    "diffrax_direct": "DirectAdjoint()",
    "diffrax_backsolve": "BacksolveAdjoint()",
    "torch_odeint": "torchdiffeq odeint",
    "torch_odeint_adjoint": "torchdiffeq odeint_adjoint",
}
DESCRIPTION = {
    "backprop": "neuralode backprop (`BackpropAdjoint`)",
    "continuous": "neuralode continuous (`ContinuousAdjoint` over `BacksolveAdjoint`)",
    "symplectic": 'neuralode symplectic (`SymplecticAdjoint(checkpoints="all")`)',
    "symplectic_default": "neuralode symplectic, default checkpoints (`SymplecticAdjoint()`)",
    "diffrax_rca": "diffrax `RecursiveCheckpointAdjoint()` (default checkpoints)",
    "diffrax_rca_n": "diffrax `RecursiveCheckpointAdjoint(checkpoints=n)`",
    "diffrax_direct": "diffrax `DirectAdjoint()`",
    "diffrax_backsolve": "diffrax `BacksolveAdjoint()`",
    "torch_odeint": "torchdiffeq `odeint` (rk4, fixed grid)",
    "torch_odeint_adjoint": "torchdiffeq `odeint_adjoint` (rk4, fixed grid)",
    "symplectic_c": "neuralode `SymplecticAdjoint(checkpoints=c)`",
    "diffrax_rca_c": "diffrax `RecursiveCheckpointAdjoint(checkpoints=c)`",
}
# Promised memory orders (DESIGN.md), and the exponents they imply in n, m, d when the
# term that grows dominates.
PROMISED = {
    "backprop": ("O(n·s·m·d)", 1, 1, 1),
    "continuous": ("O(m·d)", 0, 1, 1),
    "symplectic": ("O(n·d + s·d + m·d)", 1, "≤1", "≤1"),
}
_LADDER = re.compile(r"^(symplectic|diffrax_rca)_c(\d+)$")


def ladder(strategy: str) -> tuple[str, int] | None:
    """(family, checkpoints) of a ladder strategy such as `symplectic_c8`, else None."""
    match = _LADDER.match(strategy)
    return (match.group(1), int(match.group(2))) if match else None


def family(strategy: str) -> str:
    """`symplectic_c8` -> `symplectic_c`; every other name is its own family."""
    return ladder(strategy)[0] + "_c" if ladder(strategy) else strategy


def label(strategy: str) -> str:
    rung = ladder(strategy)
    if rung is None:
        return LABEL.get(strategy, strategy)
    name = (
        "SymplecticAdjoint" if rung[0] == "symplectic" else "RecursiveCheckpointAdjoint"
    )
    return f"{name}(checkpoints={rung[1]})"


def is_exact(strategy: str) -> bool:
    return strategy == "torch_odeint" or (
        strategy.startswith(EXACT_FAMILIES) and strategy != "diffrax_backsolve"
    )


def is_diffrax(strategy: str) -> bool:
    return strategy.startswith("diffrax_")


def order(strategy: str) -> tuple:
    """Sort key: the fixed strategies in their listed order, then ladders by rung."""
    names = CORE + ("symplectic_default",) + PEERS + TORCH
    rung = ladder(strategy)
    if rung is None:
        return (names.index(strategy) if strategy in names else len(names), 0)
    return (len(names) + 1 + (rung[0] != "symplectic"), rung[1])


def make_adjoint(strategy: str, n: int, tol=None):
    """The `diffrax.AbstractAdjoint` of `strategy` for a solve of at most n steps; `tol`:
    the backward tolerance of `continuous` in the tolerance sweep."""
    import diffrax

    import neuralode

    rung = ladder(strategy)
    if rung is not None:
        if rung[0] == "symplectic":
            return neuralode.SymplecticAdjoint(checkpoints=rung[1])
        return diffrax.RecursiveCheckpointAdjoint(checkpoints=rung[1])
    if strategy == "symplectic":  # every step kept: the O(n·d) schedule measured here
        return neuralode.SymplecticAdjoint(checkpoints="all")
    if strategy == "symplectic_default":
        return neuralode.SymplecticAdjoint()
    if strategy == "continuous" and tol is not None:
        return neuralode.get_adjoint("continuous", rtol=tol, atol=tol)
    if strategy in neuralode.ADJOINT_NAMES:
        return neuralode.get_adjoint(strategy)
    return {
        "diffrax_rca": lambda: diffrax.RecursiveCheckpointAdjoint(),
        "diffrax_rca_n": lambda: diffrax.RecursiveCheckpointAdjoint(checkpoints=n),
        "diffrax_direct": lambda: diffrax.DirectAdjoint(),
        "diffrax_backsolve": lambda: diffrax.BacksolveAdjoint(),
    }[strategy]()


def schedule_depends_on_max_steps(strategy: str) -> bool:
    """Whether the schedule (so the count of evaluations of f) changes with `max_steps`
    when n steps are taken: checkpointing, and backprop's blocks of steps (cut off at
    `max_steps`)."""
    return (
        strategy in ("backprop", "diffrax_rca", "diffrax_direct")
        or ladder(strategy) is not None
    )
