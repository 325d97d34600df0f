"""`choose_adjoint`: the fastest candidate whose compiled gradient fits the budget, from
XLA's memory analysis; a clear error when none fits."""

import diffrax
import jax
import jax.numpy as jnp
import pytest

import neuralode

FIELD = neuralode.MLPField(4, 16, 1, key=jax.random.PRNGKey(0))
Y0 = jnp.full((8, 4), 0.3)


def loss_fn(adjoint, field, y0):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        diffrax.Tsit5(),
        0.0,
        1.0,
        1 / 12,
        y0,
        adjoint=adjoint,
        max_steps=16,
    )
    return jnp.sum(sol.ys**2)


def test_choice_fits_and_is_the_fastest_that_does():
    table = neuralode.choose_adjoint(loss_fn, FIELD, Y0, memory_budget="1GiB").table
    by_name = {row.name: row for row in table}
    backprop = by_name["backprop"]
    symplectic = by_name["symplectic (every step)"]
    whole_steps = by_name["symplectic (every step, step activations)"]
    assert symplectic.bytes < whole_steps.bytes < backprop.bytes
    assert backprop.evaluations < whole_steps.evaluations < symplectic.evaluations
    # Fewer checkpoints: less memory, more recomputation.
    ladder = [row for row in table if "checkpoints=" in row.name]
    assert len(ladder) >= 3
    assert ladder[-1].bytes < ladder[0].bytes
    assert ladder[-1].evaluations > ladder[0].evaluations

    budget = (symplectic.bytes + whole_steps.bytes) // 2
    choice = neuralode.choose_adjoint(loss_fn, FIELD, Y0, memory_budget=budget)
    assert choice.name == "symplectic (every step)"
    assert choice.adjoint == neuralode.SymplecticAdjoint(checkpoints="all")
    fitting = [row for row in choice.table if row.bytes <= budget]
    assert [row.fits for row in choice.table] == [
        row.bytes <= budget for row in choice.table
    ]
    figures = lambda table: [(row.name, row.bytes, row.evaluations) for row in table]
    assert figures(choice.table) == figures(table)
    again = neuralode.choose_adjoint(loss_fn, FIELD, Y0, memory_budget=budget)
    assert again == choice  # the same inputs, the same choice
    assert min(row.evaluations for row in fitting) == by_name[choice.name].evaluations
    assert "symplectic (every step)" in str(choice)
    # The chosen adjoint's gradient runs and is the exact one.
    grad = jax.grad(loss_fn, argnums=2)
    reference = grad(diffrax.RecursiveCheckpointAdjoint(), FIELD, Y0)
    assert jnp.allclose(grad(choice.adjoint, FIELD, Y0), reference, rtol=1e-12)


def test_nothing_fits():
    with pytest.raises(ValueError, match="smallest need is .* by symplectic"):
        neuralode.choose_adjoint(loss_fn, FIELD, Y0, memory_budget="1KiB")


@pytest.mark.parametrize(
    "budget, message",
    [
        ("2 parsecs", "must be bytes"),
        (-5, "must be positive"),
        (1.5, r"in \(0, 1\]"),
        (0.5, "does not report its memory"),  # the CPU backend
    ],
)
def test_bad_budgets(budget, message):
    with pytest.raises(ValueError, match=message):
        neuralode.choose_adjoint(loss_fn, FIELD, Y0, memory_budget=budget)


def test_loss_that_ignores_the_adjoint():
    with pytest.raises(ValueError, match="must pass `adjoint`"):
        neuralode.choose_adjoint(
            lambda adjoint, y0: jnp.sum(y0), Y0, memory_budget="1GiB"
        )
