"""Bad input fails early, with one message that says what was wrong: a non-finite y0 or
parameter (with `throw=True`), a field whose output is not shaped like the state, a
solve that runs out of steps."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import neuralode

FIELD = neuralode.MLPField(3, 4, 1, key=jax.random.PRNGKey(0))
Y0 = jnp.array([0.5, -0.3, 0.2])
STRATEGIES = ("backprop", "continuous", "symplectic")


@pytest.mark.parametrize("name", STRATEGIES)
def test_non_finite_inputs_and_too_few_steps(name):
    adjoint = neuralode.get_adjoint(name)

    @eqx.filter_jit
    def value_and_grad(field, y0, t1):
        def loss(field, y0):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(field),
                diffrax.Tsit5(),
                0.0,
                t1,
                0.1,
                y0,
                adjoint=adjoint,
                max_steps=8,
            )
            return jnp.sum(sol.ys**2)

        return eqx.filter_value_and_grad(loss)(field, y0)

    value, _ = value_and_grad(FIELD, Y0, 0.5)  # fine: 5 steps
    assert jnp.isfinite(value)
    bad_field = eqx.tree_at(
        lambda f: f.mlp.layers[0].bias, FIELD, replace_fn=lambda b: b.at[0].set(jnp.inf)
    )
    for field, y0 in [(FIELD, Y0.at[1].set(jnp.nan)), (bad_field, Y0)]:
        with pytest.raises(Exception, match="contain NaN or inf"):
            value_and_grad(field, y0, 0.5)
    with pytest.raises(Exception, match="maximum number of solver steps"):
        value_and_grad(FIELD, Y0, 2.0)  # 20 steps needed


@pytest.mark.parametrize(
    "field, y0, message",
    [
        (
            lambda t, y, args: FIELD(t, y)[:2],
            Y0,
            r"shape \(2,\) .* state of shape \(3,\)",
        ),
        (
            lambda t, y, args: FIELD(t, y).astype(jnp.float32),
            Y0,
            "dtype float32 for the state of shape .* dtype float64",
        ),
        (lambda t, y, args: FIELD(t, y[0]), (Y0, Y0), "structure"),
    ],
    ids=["shape", "dtype", "pytree"],
)
def test_field_not_shaped_like_the_state(field, y0, message):
    model = neuralode.NeuralODE(field, dt0=0.1, max_steps=16)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model, jnp.linspace(0.0, 1.0, 3), y0)
    # Straight to Diffrax, which broadcasts a wrong shape and checks the structure
    # itself, each strategy refuses a wrong dtype that Diffrax would promote.
    if message.startswith("dtype"):
        for name in STRATEGIES:
            solve = lambda y0, name=name: (
                diffrax.diffeqsolve(
                    diffrax.ODETerm(field),
                    diffrax.Tsit5(),
                    0.0,
                    1.0,
                    0.1,
                    y0,
                    adjoint=neuralode.get_adjoint(name),
                    max_steps=16,
                ).ys
            )
            with pytest.raises(ValueError, match=message):
                jax.eval_shape(solve, y0)
