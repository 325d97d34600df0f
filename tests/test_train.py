"""The training loop: resume gives the same losses, checkpoints are checked, written
atomically and kept when training diverges; the shared command-line options."""

import argparse
import json
import os

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import neuralode


class Linear(eqx.Module):
    weight: jax.Array

    def __call__(self, x):
        return x @ self.weight


def _problem():
    true_weight = jnp.array([[1.0], [-2.0], [0.5]])
    model = Linear(jnp.zeros((3, 1)))

    def sample_batch(key):
        x = jax.random.normal(key, (8, 3))
        return x, x @ true_weight

    def loss_fn(model, batch):
        x, y = batch
        return jnp.mean((model(x) - y) ** 2), jnp.array(0)

    return model, sample_batch, loss_fn


def _fit(out_dir, niters, *, resume=False, config=None, lr=0.1, checkpoint_every=2):
    model, sample_batch, loss_fn = _problem()
    return neuralode.fit(
        loss_fn,
        model,
        optax.adam(lr),
        sample_batch,
        niters=niters,
        key=jax.random.PRNGKey(0),
        out_dir=out_dir,
        config=config or {"lr": lr},
        metadata={"adjoint": "none"},
        checkpoint_every=checkpoint_every,
        resume=resume,
        progress=False,
    )


def test_metrics_and_resume_equal(tmp_path):
    full = _fit(tmp_path / "full", 6)
    assert full.metrics["loss"][-1] < full.metrics["loss"][0]
    with open(tmp_path / "full" / "metrics.json") as f:
        written = json.load(f)
    for name in ("loss", "time_s", "nfe"):
        assert len(written[name]) == 6
    assert written["adjoint"] == "none" and written["memory_bytes"] >= 0

    _fit(tmp_path / "split", 3)
    resumed = _fit(tmp_path / "split", 6, resume=True)
    assert resumed.metrics["loss"] == full.metrics["loss"]
    np.testing.assert_array_equal(resumed.model.weight, full.model.weight)
    # Resuming a finished run trains no further.
    again = _fit(tmp_path / "split", 6, resume=True)
    assert again.metrics["loss"] == full.metrics["loss"]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(neuralode.CheckpointError, match="does not exist"):
        _fit(tmp_path, 2, resume=True)
    _fit(tmp_path, 2)
    path = tmp_path / "checkpoint.eqx"
    good = path.read_bytes()

    with pytest.raises(neuralode.CheckpointError, match="different configuration.*lr"):
        _fit(tmp_path, 4, resume=True, lr=0.5)
    for bad in (
        b"garbage",
        good[:-5],
        good + b"xx",
        good.replace(b'"iteration"', b"!"),
    ):
        path.write_bytes(bad)
        with pytest.raises(neuralode.CheckpointError, match="corrupt|not a neuralode"):
            _fit(tmp_path, 4, resume=True)
        assert path.read_bytes() == bad  # not overwritten
    # Same configuration, but a model of another shape.
    path.write_bytes(good)
    like = (jnp.zeros((4, 1)),)
    with pytest.raises(neuralode.CheckpointError):
        neuralode.load_checkpoint(path, like)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = jnp.array(1.0)

    def loss_fn(w, batch):
        return w**2, jnp.array(0)

    # Plain gradient descent with a huge step overflows within a few iterations.
    with pytest.raises(neuralode.TrainingDiverged, match="non-finite"):
        neuralode.fit(
            loss_fn,
            model,
            optax.sgd(1e10),
            lambda key: None,
            niters=40,
            key=jax.random.PRNGKey(0),
            out_dir=tmp_path,
            checkpoint_every=1,
            progress=False,
        )
    with open(tmp_path / "metrics.json") as f:
        metrics = json.load(f)
    assert "non-finite" in metrics["stopped"]
    (w, _, _), iteration, history = neuralode.load_checkpoint(
        tmp_path / "checkpoint.eqx",
        (model, optax.sgd(1e10).init(model), jax.random.PRNGKey(0)),
    )
    assert iteration == len(metrics["loss"]) >= 1 and np.isfinite(w)
    assert history["loss"] == metrics["loss"]


def test_function_evaluations():
    n = jnp.array(10)
    assert int(neuralode.function_evaluations(diffrax.Euler(), n)) == 10
    assert int(neuralode.function_evaluations(diffrax.Heun(), n)) == 20
    assert int(neuralode.function_evaluations(diffrax.Tsit5(), n)) == 61  # FSAL
    assert int(neuralode.function_evaluations(diffrax.Dopri8(), n)) == 131
    with pytest.raises(ValueError, match="explicit Runge"):
        neuralode.function_evaluations(diffrax.ImplicitEuler(), n)


def test_function_evaluations_match_a_counting_field():
    # Count the evaluations with a host callback: the count from the stats is honest.
    calls = []

    def field(t, y, args):
        jax.debug.callback(lambda: calls.append(1))
        return -y

    for solver in (diffrax.Euler(), diffrax.Midpoint(), diffrax.Bosh3()):
        calls.clear()
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            solver,
            0.0,
            1.0,
            0.25,
            jnp.ones(2),
            adjoint=diffrax.DirectAdjoint(),
        )
        jax.effects_barrier()
        expected = int(neuralode.function_evaluations(solver, sol.stats["num_steps"]))
        assert len(calls) == expected


def _parser():
    parser = argparse.ArgumentParser(prog="example")
    return neuralode.add_training_arguments(
        parser, niters=10, batch_size=4, lr=1e-3, steps=7, out="runs/x"
    )


def test_cli_defaults_and_building():
    args = neuralode.parse_training_args(_parser(), [])
    assert (args.steps, args.rtol, args.atol, args.niters) == (7, None, None, 10)
    assert args.adjoint == "symplectic" and args.solver == "tsit5"
    controller, dt0, max_steps = neuralode.stepping_from_args(args, 1.4)
    assert isinstance(controller, diffrax.ConstantStepSize)
    assert dt0 == pytest.approx(0.2) and max_steps == 8

    args = neuralode.parse_training_args(
        _parser(), ["--rtol", "1e-4", "--max-steps", "9"]
    )
    assert args.atol == 1e-4 and args.steps is None
    controller, dt0, max_steps = neuralode.stepping_from_args(args, 1.0)
    assert isinstance(controller, diffrax.PIDController) and dt0 is None
    assert max_steps == 9
    for name in neuralode.ADJOINT_NAMES:
        args = neuralode.parse_training_args(_parser(), ["--adjoint", name])
        assert isinstance(neuralode.adjoint_from_args(args), diffrax.AbstractAdjoint)
    for name, cls in neuralode.SOLVERS.items():
        assert type(neuralode.solver_from_name(name)) is cls
    config = neuralode.run_config(
        neuralode.parse_training_args(_parser(), ["--resume"])
    )
    assert "resume" not in config and "niters" not in config and config["lr"] == 1e-3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--niters", "-3"], "positive integer"),
        (["--niters", "0"], "positive integer"),
        (["--batch-size", "x"], "positive integer"),
        (["--lr", "0"], "positive number"),
        (["--lr", "nan"], "positive number"),
        (["--steps", "4", "--rtol", "1e-3"], "cannot be combined"),
        (["--steps", "4", "--atol", "1e-3"], "cannot be combined"),
        (["--solver", "rk4"], "invalid choice"),
        (["--adjoint", "magic"], "invalid choice"),
        (["--solver", "euler", "--rtol", "1e-3"], "no error estimate"),
        (["--checkpoint-every", "0"], "positive integer"),
    ],
)
def test_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        neuralode.parse_training_args(_parser(), argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
