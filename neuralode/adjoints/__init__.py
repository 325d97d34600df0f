"""The gradient strategies, each a `diffrax.AbstractAdjoint`, and the one registry of their
names: `get_adjoint(name, **options)`."""

from typing import Any

import diffrax

from ._backprop import BackpropAdjoint as BackpropAdjoint
from ._choose import Choice as Choice, choose_adjoint as choose_adjoint
from ._continuous import ContinuousAdjoint as ContinuousAdjoint
from ._reversible import (
    Reversible as Reversible,
    ReversibleAdjoint as ReversibleAdjoint,
)
from ._symplectic import SymplecticAdjoint as SymplecticAdjoint


def _make_backprop(**options: Any) -> diffrax.AbstractAdjoint:
    _check_options("backprop", options, ())
    return BackpropAdjoint()


def _make_symplectic(**options: Any) -> diffrax.AbstractAdjoint:
    """`SymplecticAdjoint(checkpoints=...)`: `None` (Diffrax's default number),
    an int, or `"all"` (every step)."""
    _check_options("symplectic", options, ("checkpoints", "step_activations"))
    return SymplecticAdjoint(**options)


def _make_reversible(**options: Any) -> diffrax.AbstractAdjoint:
    """`ReversibleAdjoint(coupling=...)`: the λ with which it wraps solvers."""
    _check_options("reversible", options, ("coupling",))
    return ReversibleAdjoint(**options)


_CONTINUOUS_OPTIONS = (
    "rtol",
    "atol",
    "seminorm",
    "solver",
    "stepsize_controller",
    "dt0",
    "max_steps",
)


def _make_continuous(**options: Any) -> diffrax.AbstractAdjoint:
    """`diffrax.BacksolveAdjoint` (inside `ContinuousAdjoint`). `rtol`/`atol` set a `PIDController` for the backward
    solve; `seminorm=True` measures its error only on the state and adjoint state, not on
    the parameter cotangents (Kidger, Chen & Lyons 2021), which needs `rtol` and `atol`.
    Without them the backward solve reuses the forward solve's solver and step control."""
    _check_options("continuous", options, _CONTINUOUS_OPTIONS)
    rtol = options.pop("rtol", None)
    atol = options.pop("atol", None)
    seminorm = options.pop("seminorm", False)
    if not isinstance(seminorm, bool):
        raise ValueError(
            f"get_adjoint('continuous'): `seminorm` must be True or False, got "
            f"{seminorm!r}."
        )
    if (rtol is None) != (atol is None):
        raise ValueError(
            "get_adjoint('continuous'): pass both `rtol` and `atol`, or neither."
        )
    if rtol is not None:
        if "stepsize_controller" in options:
            raise ValueError(
                "get_adjoint('continuous'): pass either `rtol`/`atol` or "
                "`stepsize_controller`, not both."
            )
        controller = diffrax.PIDController(rtol=rtol, atol=atol)
        if seminorm:
            controller = diffrax.PIDController(
                rtol=rtol, atol=atol, norm=diffrax.adjoint_rms_seminorm
            )
        options["stepsize_controller"] = controller
    elif seminorm:
        raise ValueError(
            "get_adjoint('continuous', seminorm=True) needs `rtol` and `atol`: the "
            "seminorm is a norm for the adaptive backward solve's error control."
        )
    return ContinuousAdjoint(diffrax.BacksolveAdjoint(**options))


def _check_options(name: str, options: dict[str, Any], valid: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"get_adjoint({name!r}) got unknown option(s) {unknown}; valid options are "
            f"{list(valid)}."
        )


_REGISTRY = {
    "backprop": _make_backprop,
    "continuous": _make_continuous,
    "symplectic": _make_symplectic,
    "reversible": _make_reversible,
}

ADJOINT_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_adjoint(name: str, **options: Any) -> diffrax.AbstractAdjoint:
    """The gradient strategy called `name`, configured by `options`.

    **Arguments:**

    - `name`: one of `neuralode.ADJOINT_NAMES`: `"backprop"` (every intermediate kept),
        `"continuous"` (`neuralode.ContinuousAdjoint` around `diffrax.BacksolveAdjoint`:
        continuous adjoint, approximate),
        `"symplectic"` (`neuralode.SymplecticAdjoint`: exact, memory-lean),
        `"reversible"` (`neuralode.ReversibleAdjoint`: exact for a
        `neuralode.Reversible` solver, memory independent of the number of steps).
    - `options`: for `"continuous"`: `rtol`, `atol`, `seminorm`, `solver`,
        `stepsize_controller`, `dt0`, `max_steps` of the backward solve. That solve runs
        from t1 to t0, so its `dt0` is negative for a solve forward in time. For
        `"symplectic"`: `checkpoints` (an int, `"all"`, or `None` for Diffrax's
        default number) and `step_activations` (a bool). For `"reversible"`:
        `coupling` (λ, with which `ReversibleAdjoint.wrap` makes a solver
        reversible). `"backprop"` takes none.

    **Returns:**

    A `diffrax.AbstractAdjoint`, to pass as `diffrax.diffeqsolve(..., adjoint=...)`.

    ```python
    adjoint = neuralode.get_adjoint("continuous", rtol=1e-6, atol=1e-6, seminorm=True)
    ```
    """
    try:
        make = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown adjoint {name!r}; valid names are {list(ADJOINT_NAMES)}."
        ) from None
    return make(**options)
