import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import as_users_run_it, assert_tree_allclose

import neuralode
import neuralode.measure

TS = jnp.linspace(0.0, 1.0, 5)


def _model(key, adjoint, **kwargs):
    field = neuralode.MLPField(2, 16, 2, time_dependent=True, key=key)
    return neuralode.NeuralODE(field, adjoint=adjoint, dt0=0.1, max_steps=16, **kwargs)


def test_jit_vmap_grad_and_strategies_agree(getkey):
    key = getkey()
    y0s = jax.random.normal(getkey(), (4, 2))

    @eqx.filter_jit
    def loss_and_grad(model):
        def loss(model):
            ys = jax.vmap(model, in_axes=(None, 0))(TS, y0s)
            assert ys.shape == (4, len(TS), 2)
            return jnp.mean(ys**2)

        value, grad = eqx.filter_value_and_grad(loss)(model)
        return value, grad.field

    results = {
        name: loss_and_grad(_model(key, name))
        for name in neuralode.ADJOINT_NAMES
        if name != "reversible"
    }
    assert_tree_allclose(results["symplectic"], results["backprop"], 1e-12)
    # Reversible solves are another discretisation: their reference is Diffrax's
    # default adjoint on the same solver.
    reversible = neuralode.Reversible(diffrax.Tsit5())
    assert_tree_allclose(
        loss_and_grad(_model(key, "reversible", solver=reversible)),
        loss_and_grad(
            _model(key, diffrax.RecursiveCheckpointAdjoint(), solver=reversible)
        ),
        1e-12,
    )
    # The continuous adjoint is close, not equal.
    loss_c, grad_c = results["continuous"]
    assert loss_c == results["backprop"][0]
    assert neuralode.measure.relative_error(grad_c, results["backprop"][1]) < 1e-2


def test_batched_state_is_one_solve(getkey):
    # A (batch, dim) state is solved as one ODE, the field mapped over the batch.
    model = _model(getkey(), "symplectic")
    y0s = jax.random.normal(getkey(), (3, 2))
    assert_tree_allclose(
        model(TS, y0s),
        jax.vmap(model, in_axes=(None, 0))(TS, y0s).swapaxes(0, 1),
        1e-12,
    )


def test_solve_returns_solution_with_stats(getkey):
    sol = _model(getkey(), "backprop").solve(TS, jnp.ones(2))
    assert int(sol.stats["num_accepted_steps"]) == 10


def test_bad_input_is_refused_early(getkey):
    # The library's own checks, as a user without the type checker meets them.
    with as_users_run_it():
        field = neuralode.MLPField(2, 8, 1, key=getkey())
        with pytest.raises(ValueError, match="dt0"):
            neuralode.NeuralODE(field)
        with pytest.raises(ValueError, match="valid names"):
            neuralode.NeuralODE(field, adjoint="adjoint", dt0=0.1)
        with pytest.raises(ValueError, match="max_steps"):
            neuralode.NeuralODE(field, dt0=0.1, max_steps=0)
        with pytest.raises(ValueError, match=r"neuralode\.Reversible\(Tsit5\(\)\)"):
            neuralode.NeuralODE(field, adjoint="reversible", dt0=0.1)
        with pytest.raises(ValueError, match="ts"):
            neuralode.NeuralODE(field, dt0=0.1)(jnp.array(1.0), jnp.ones(2))
        with pytest.raises(ValueError, match="last axis has size 2"):
            field(0.0, jnp.ones(3))
        with pytest.raises(ValueError, match="width"):
            neuralode.MLPField(2, 0, 1, key=getkey())
        # Wrong types name the argument, at construction.
        for kwargs, name in [
            (dict(adjoint=3), "adjoint"),
            (dict(solver="tsit5"), "solver"),
            (dict(stepsize_controller=1e-3), "stepsize_controller"),
            (dict(max_steps=True), "max_steps"),
        ]:
            with pytest.raises(ValueError, match=f"`{name}` must be"):
                neuralode.NeuralODE(field, dt0=0.1, **kwargs)
        with pytest.raises(ValueError, match="`state_dim` must be"):
            neuralode.MLPField(True, 8, 1, key=getkey())
        with pytest.raises(ValueError, match="`time_dependent` must be"):
            neuralode.MLPField(2, 8, 1, time_dependent="no", key=getkey())
        with pytest.raises(ValueError, match="`t` must be a scalar"):
            neuralode.MLPField(2, 8, 1, time_dependent=True, key=getkey())(
                jnp.zeros(3), jnp.ones((3, 2))
            )
    # NumPy integers are integers, and NumPy arrays are states (type checker or not).
    field = neuralode.MLPField(np.int64(2), 8, 1, key=getkey())
    assert field(0.0, np.array([1.0, 2.0])).shape == (2,)


def test_adaptive_model_accepts_any_adjoint_object(getkey):
    field = neuralode.MLPField(2, 8, 1, key=getkey())
    model = neuralode.NeuralODE(
        field,
        adjoint=diffrax.RecursiveCheckpointAdjoint(),
        stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-5),
        solver=diffrax.Dopri5(),
    )
    assert model(TS, jnp.ones(2)).shape == (len(TS), 2)
