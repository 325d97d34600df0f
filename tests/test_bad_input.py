"""Bad input fails early, with one message that says what was wrong: a non-finite y0 or
parameter (with `throw=True`), a field whose output is not shaped like the state, a
solve that runs out of steps; and training that meets it keeps its checkpoint."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest

import neuralode
import neuralode.training as training

FIELD = neuralode.MLPField(3, 4, 1, key=jax.random.PRNGKey(0))
Y0 = jnp.array([0.5, -0.3, 0.2])
STRATEGIES = neuralode.ADJOINT_NAMES


@pytest.mark.parametrize("name", STRATEGIES)
def test_non_finite_inputs_and_too_few_steps(name):
    adjoint = neuralode.get_adjoint(name)
    solver = diffrax.Tsit5()
    if isinstance(adjoint, neuralode.ReversibleAdjoint):
        solver = adjoint.wrap(solver)

    @eqx.filter_jit
    def value_and_grad(field, y0, t1):
        def loss(field, y0):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(field),
                solver,
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


def _fit(out_dir, niters, field_of=None, batch_of=None, max_steps=16):
    """Train FIELD through a `NeuralODE` on [0, 1] (10 steps); `field_of(field)` and
    `batch_of(key)` (y0) may be bad."""
    field_of = field_of or (lambda field: field)
    batch_of = batch_of or (lambda key: Y0 + 0.1 * jax.random.normal(key, (3,)))

    def loss_fn(field, y0):
        model = neuralode.NeuralODE(field_of(field), dt0=0.1, max_steps=max_steps)
        ys = model(jnp.array([0.0, 1.0]), y0)
        return sum(jnp.sum(y**2) for y in jax.tree_util.tree_leaves(ys)), None

    return training.fit(
        loss_fn,
        FIELD,
        optax.adam(1e-3),
        batch_of,
        niters=niters,
        key=jax.random.PRNGKey(0),
        out_dir=out_dir,
        progress=False,
        resume=(out_dir / "checkpoint.eqx").exists(),
    )


BAD_TRAINING = {
    "nan-y0": (
        dict(batch_of=lambda key: Y0.at[0].set(jnp.nan)),
        training.TrainingStopped,
        "contain NaN or inf",
    ),
    "max-steps": (
        dict(max_steps=4),
        training.TrainingStopped,
        "maximum number of solver steps",
    ),
    "shape": (
        dict(field_of=lambda field: lambda t, y, args: field(t, y)[:2]),
        ValueError,
        r"shape \(2,\)",
    ),
    "pytree": (
        dict(
            field_of=lambda field: lambda t, y, args: field(t, y[0]),
            batch_of=lambda key: (Y0, Y0),
        ),
        ValueError,
        "structure",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAINING))
def test_training_keeps_its_checkpoint(case, tmp_path):
    # A run that trained for 2 iterations, resumed with bad input: one message says
    # what was wrong, and the checkpoint is left as it was.
    _fit(tmp_path, 2)
    before = (tmp_path / "checkpoint.eqx").read_bytes()
    bad, error, message = BAD_TRAINING[case]
    with pytest.raises(error, match=message):
        _fit(tmp_path, 4, **bad)
    assert (tmp_path / "checkpoint.eqx").read_bytes() == before
