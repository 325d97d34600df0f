"""The one place that touches Diffrax internals (and the Equinox loop internals that
Diffrax's loops are built on).

Tested against diffrax 0.7.2 (pinned in pyproject.toml). Everything else in neuralode
uses Diffrax's public API. What is borrowed, and why:

- `loop`: the solve loop `diffeqsolve` hands to an adjoint (also reached as the
  `AbstractAdjoint._loop` property); a custom VJP must call it itself.
- `SaveState`: the custom adjoint adds a `SubSaveAt(steps=True)` to record each accepted
  step, and must allocate its buffer in the loop's state the way `diffeqsolve` does.
- `only_transpose_ys`, `nondiff_solver_controller_state`: the same guards that
  `diffrax.BacksolveAdjoint` puts around its custom VJP (only the saved `ys` carry
  cotangents; a user-passed solver/controller state is not differentiable).
- `clip_to_end`: how the loop ends a step proposed to end just short of t1; recomputing
  a step exactly as the loop took it needs the same rule.
- `is_sde`, `is_unsafe_sde`: to recognise what the symplectic adjoint refuses;
  `save_y`: the default `SaveAt(fn=...)`, whose cotangent needs no VJP.
"""

from diffrax._adjoint import (
    _nondiff_solver_controller_state as nondiff_solver_controller_state,
    _only_transpose_ys as only_transpose_ys,
)
from diffrax._heuristics import is_sde as is_sde, is_unsafe_sde as is_unsafe_sde
from diffrax._integrate import (
    SaveState as SaveState,
    _clip_to_end as clip_to_end,
    loop as loop,
)
from diffrax._saveat import save_y as save_y
from equinox.internal._loop.common import common_rewrite as common_rewrite

__all__ = [
    "SaveState",
    "clip_to_end",
    "common_rewrite",
    "is_sde",
    "is_unsafe_sde",
    "loop",
    "nondiff_solver_controller_state",
    "only_transpose_ys",
    "save_y",
]
