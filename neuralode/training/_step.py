"""One training iteration as a pure, jitted function of the training state.

Everything random in a step (the minibatch, Hutchinson noise) is drawn inside the step
from the key in the state, which the step splits and returns. The state is therefore
all a run needs to continue exactly: a resumed run draws the same batches as an
uninterrupted one and gives the same losses, on any number of devices.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.stages
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, PRNGKeyArray, PyTree

from ._parallel import BatchAxes, batch_shardings, replicated


class TrainState(NamedTuple):
    """What one iteration changes: the model's floating-point arrays `params` (the
    rest of the model is held fixed), the optimiser's state and the random key."""

    params: PyTree
    opt_state: PyTree
    key: PRNGKeyArray

    @classmethod
    def init(
        cls,
        model: PyTree,
        optimiser: optax.GradientTransformation,
        key: PRNGKeyArray,
    ) -> "TrainState":
        """The state before the first iteration. Its arrays are copies: a step that
        donates them leaves `model` intact. `eqx.combine(state.params, model)` is the
        model with the state's parameters."""
        params = eqx.filter(model, eqx.is_inexact_array)
        params = jax.tree_util.tree_map(jnp.copy, params)
        return cls(params, optimiser.init(params), jnp.copy(key))


class StepOutput(NamedTuple):
    """What a step reports besides the new state: the `loss`, the loss function's `aux`
    output, and whether the loss and the updated parameters are `finite`."""

    loss: Float[Array, ""]
    aux: PyTree
    finite: Bool[Array, ""]


def make_train_step(
    loss_fn: Callable[[PyTree, Any], tuple[Float[Array, ""], PyTree]],
    optimiser: optax.GradientTransformation,
    sample_batch: Callable[[PRNGKeyArray], Any],
    model: PyTree,
    *,
    donate: bool = True,
    mesh: Mesh | None = None,
    batch_axes: BatchAxes = 0,
) -> jax.stages.Wrapped:
    """A jitted training iteration `step(state) -> (state, output)`.

    It splits the key, draws a minibatch with `sample_batch`, takes the gradient of
    `loss_fn` with respect to the model's floating-point arrays, and applies the optax
    update. An update that makes the loss or the parameters non-finite is not applied:
    the state comes back as it was, with `output.finite` false.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, batch) -> (loss, aux)`: a scalar loss and anything
        else to report (e.g. the number of function evaluations).
    - `optimiser`: an `optax.GradientTransformation`.
    - `sample_batch`: `sample_batch(key) -> batch`, traceable by JAX.
    - `model`: the model (an Equinox module); its arrays that are not floating point,
        and everything that is not an array, are held fixed.
    - `donate`: donate the state's buffers to the step, so that the new state can
        reuse their memory. The state passed in is then no longer usable.
    - `mesh`: data parallelism over this 1-D mesh
        (`neuralode.training.data_parallel_mesh`): the minibatch is split along the
        mesh, the state replicated (place it with `neuralode.training.replicate`),
        and XLA sums the gradient over the devices.
    - `batch_axes`: with `mesh`, the batch axis of each leaf of the minibatch, as
        `jax.vmap`'s `in_axes` (an int for all, or a prefix tree of ints; None for a
        leaf that is not split). Its size must be divisible by the number of devices.

    **Returns:**

    The step, a `jax.jit`-compiled function (`step.lower(state).compile()` gives its
    compiled program). Start from `neuralode.training.TrainState.init`.

    ```python
    step = make_train_step(loss_fn, optax.adam(1e-3), sample_batch, model)
    state = TrainState.init(model, optax.adam(1e-3), jax.random.PRNGKey(0))
    for _ in range(100):
        state, output = step(state)
    model = eqx.combine(state.params, model)
    ```
    """
    static = eqx.filter(model, eqx.is_inexact_array, inverse=True)

    def step(state: TrainState) -> tuple[TrainState, StepOutput]:
        key, batch_key = jax.random.split(state.key)
        batch = _draw_batch(sample_batch, batch_key, mesh, batch_axes)

        def loss_of_params(params):
            return loss_fn(eqx.combine(params, static), batch)

        (loss, aux), grads = jax.value_and_grad(loss_of_params, has_aux=True)(
            state.params
        )
        params, opt_state = _apply_update(optimiser, grads, state)
        finite = _all_finite(loss, params)
        new = TrainState(params, opt_state, key)
        # A non-finite update is not applied: the state comes back as it was.
        new = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, state)
        if mesh is not None:
            new = jax.lax.with_sharding_constraint(new, replicated(mesh))
        return new, StepOutput(loss, aux, finite)

    donate_argnums = 0 if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    return jax.jit(step, donate_argnums=donate_argnums, in_shardings=replicated(mesh))


def _draw_batch(
    sample_batch: Callable[[PRNGKeyArray], Any],
    key: PRNGKeyArray,
    mesh: Mesh | None,
    batch_axes: BatchAxes,
) -> Any:
    """`sample_batch(key)`, split over `mesh` along `batch_axes`."""
    batch = sample_batch(key)
    if mesh is not None:
        # Each device draws and keeps only its own rows of the batch.
        batch = jax.lax.with_sharding_constraint(
            batch, batch_shardings(batch, batch_axes, mesh)
        )
    return batch


def _apply_update(
    optimiser: optax.GradientTransformation, grads: PyTree, state: TrainState
) -> tuple[PyTree, PyTree]:
    """The parameters and optimiser state after `optimiser`'s update with `grads`."""
    # Optax mixes Python floats with its int32 step count, which strict dtype
    # promotion refuses; the user's loss runs under their own setting.
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimiser.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state


def _all_finite(loss: Float[Array, ""], params: PyTree) -> Bool[Array, ""]:
    """Whether `loss` and every parameter are finite."""
    return jnp.isfinite(loss) & jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves(params)])
    )
