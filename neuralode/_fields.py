"""Vector fields f_θ(t, y) for neural ODEs, as Equinox modules.

A field is called as `field(t, y, args)`, the signature of `diffrax.ODETerm`, so it can be
passed straight to `diffrax.ODETerm(field)`.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ._checks import as_bool, as_int


class MLPField(eqx.Module):
    """A multilayer perceptron vector field dy/dt = MLP([y, t]).

    The MLP acts on the last axis of `y`; leading axes (a batch of states solved as one
    ODE) are mapped over, so `y` may have shape `(state_dim,)` or `(..., state_dim)`.

    **Arguments:**

    - `state_dim`: size of the last axis of the state `y`.
    - `width`: width of every hidden layer.
    - `depth`: number of hidden layers (`depth=2` means two hidden layers, three linear
        maps).
    - `activation`: the hidden activation, `tanh` by default (smooth, as an ODE's right
        hand side should be).
    - `time_dependent`: if `True`, the time `t` (a scalar) is appended to the input of
        the MLP.
    - `key`: a `jax.random` key for the initial weights.
    """

    mlp: eqx.nn.MLP
    time_dependent: bool = eqx.field(static=True)

    def __init__(
        self,
        state_dim: int | np.integer,
        width: int | np.integer,
        depth: int | np.integer,
        *,
        activation: Callable[[Array], Array] = jnp.tanh,
        time_dependent: bool = False,
        key: PRNGKeyArray,
    ) -> None:
        state_dim = as_int("MLPField", "state_dim", state_dim)
        width = as_int("MLPField", "width", width)
        depth = as_int("MLPField", "depth", depth, minimum=0)
        self.time_dependent = as_bool("MLPField", "time_dependent", time_dependent)
        self.mlp = eqx.nn.MLP(
            in_size=state_dim + int(time_dependent),
            out_size=state_dim,
            width_size=width,
            depth=depth,
            activation=activation,
            key=key,
        )

    def __call__(
        self, t: ArrayLike, y: Float[ArrayLike, "... state_dim"], args: Any = None
    ) -> Float[Array, "... state_dim"]:
        del args
        y = jnp.asarray(y)
        if y.shape[-1:] != (self.mlp.out_size,):
            raise ValueError(
                f"MLPField: expected a state whose last axis has size "
                f"{self.mlp.out_size}, got shape {y.shape}."
            )

        if self.time_dependent and jnp.ndim(t) != 0:
            # One time for the whole state: Diffrax passes a scalar.
            raise ValueError(
                f"MLPField: `t` must be a scalar, got shape {jnp.shape(t)}."
            )

        def single(y_i: Float[Array, " state_dim"]) -> Float[Array, " state_dim"]:
            if self.time_dependent:
                y_i = jnp.concatenate([y_i, jnp.reshape(t, (1,)).astype(y_i.dtype)])
            return self.mlp(y_i)

        flat = y.reshape(-1, y.shape[-1])
        return jax.vmap(single)(flat).reshape(y.shape)
