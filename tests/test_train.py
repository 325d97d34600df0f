"""The training loop: resume gives the same losses, checkpoints are checked, written
atomically and kept when training diverges; the shared command-line options."""

import argparse
import itertools
import json
import os
import signal
import stat
import time
import types

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import neuralode
import neuralode._train as train_module


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


def _fit(
    out_dir,
    niters,
    *,
    resume=False,
    overwrite=False,
    config=None,
    may_change=(),
    lr=0.1,
    checkpoint_every=2,
):
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
        may_change=may_change,
        metadata={"adjoint": "none"},
        checkpoint_every=checkpoint_every,
        resume=resume,
        overwrite=overwrite,
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
    umask = os.umask(0)
    os.umask(umask)
    for name in ("metrics.json", "checkpoint.eqx"):  # readable as the umask allows
        mode = stat.S_IMODE(os.stat(tmp_path / "full" / name).st_mode)
        assert mode == 0o666 & ~umask

    _fit(tmp_path / "split", 3)
    resumed = _fit(tmp_path / "split", 6, resume=True)
    assert resumed.metrics["loss"] == full.metrics["loss"]
    np.testing.assert_array_equal(resumed.model.weight, full.model.weight)
    # Resuming a finished run trains no further.
    again = _fit(tmp_path / "split", 6, resume=True)
    assert again.metrics["loss"] == full.metrics["loss"]


def test_output_directory_is_checked_before_training(tmp_path):
    with pytest.raises(neuralode.CheckpointError, match="does not exist"):
        _fit(tmp_path / "new", 2, resume=True)
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(neuralode.CheckpointError, match="file is not a directory"):
        _fit(tmp_path / "file" / "run", 2)

    _fit(tmp_path / "run", 4)
    path = tmp_path / "run" / "checkpoint.eqx"
    good = path.read_bytes()
    # A run started afresh by mistake must not replace a further-along checkpoint.
    with pytest.raises(
        neuralode.CheckpointError, match="already holds a checkpoint at iteration 4"
    ):
        _fit(tmp_path / "run", 2)
    assert path.read_bytes() == good
    assert _fit(tmp_path / "run", 2, overwrite=True).metrics["iterations"] == 2


def test_resume_with_changed_options(tmp_path, capsys):
    _fit(tmp_path, 2)
    with pytest.raises(neuralode.CheckpointError, match="different configuration.*lr"):
        _fit(tmp_path, 4, resume=True, lr=0.5)
    resumed = _fit(tmp_path, 4, resume=True, lr=0.5, may_change=("lr",))
    assert resumed.metrics["iterations"] == 4 and resumed.metrics["config"]["lr"] == 0.5
    assert "resuming at iteration 2 with lr 0.1 -> 0.5" in capsys.readouterr().out


def test_checkpoint_errors(tmp_path):
    _fit(tmp_path, 2)
    path = tmp_path / "checkpoint.eqx"
    good = path.read_bytes()
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


def _scalar_fit(out_dir, loss_fn, lr, niters=40):
    return neuralode.fit(
        loss_fn,
        jnp.array(1.0),
        optax.sgd(lr),
        lambda key: None,
        niters=niters,
        key=jax.random.PRNGKey(0),
        out_dir=out_dir,
        checkpoint_every=100,  # none periodic: the stop itself must checkpoint
        progress=False,
    )


def _grow(w, batch):  # w grows by 1 per iteration of sgd(1.0)
    return eqx.error_if(-w, w > 5.5, "w grew past 5.5"), jnp.array(0)


def _signal_at_3(w, batch):
    jax.debug.callback(
        lambda w: os.kill(os.getpid(), signal.SIGINT) if w == 3 else None, w
    )
    return -w, jnp.array(0)


@pytest.mark.parametrize(
    "cause, loss_fn, lr, error, message, iterations",
    [
        # Plain gradient descent with a huge step overflows in a few iterations.
        ("diverged", lambda w, b: (w**2, jnp.array(0)), 1e10, None, "non-finite", None),
        # A runtime error inside the step, as a solve that reaches max_steps raises.
        ("failed", _grow, 1.0, None, "iteration 6 failed: w grew past 5.5", 5),
        # Ctrl-C between an iteration's result and its bookkeeping.
        ("interrupted", _grow, 1.0, KeyboardInterrupt, "after iteration 3", 3),
        # Ctrl-C (a signal) during iteration 3: training stops after it.
        ("signalled", _signal_at_3, 1.0, KeyboardInterrupt, "after iteration 3", 3),
    ],
)
def test_a_stop_checkpoints_the_last_good_state(
    tmp_path, monkeypatch, cause, loss_fn, lr, error, message, iterations
):
    if cause == "interrupted":
        # The 10th call: two while compiling, two per iteration.
        calls = itertools.count()

        def perf_counter():
            if next(calls) == 9:
                raise KeyboardInterrupt
            return time.perf_counter()

        monkeypatch.setattr(
            train_module, "time", types.SimpleNamespace(perf_counter=perf_counter)
        )
    error = error or (
        neuralode.TrainingDiverged if cause == "diverged" else neuralode.TrainingStopped
    )
    with pytest.raises(error, match=message):
        _scalar_fit(tmp_path / "stopped", loss_fn, lr)
    with open(tmp_path / "stopped" / "metrics.json") as f:
        metrics = json.load(f)
    iterations = iterations or metrics["iterations"]  # when w**2 overflows, >= 1
    assert message in metrics["stopped"] and metrics["iterations"] == iterations >= 1
    like = (jnp.array(1.0), optax.sgd(lr).init(jnp.array(1.0)), jax.random.PRNGKey(0))
    (w, _, _), iteration, history = neuralode.load_checkpoint(
        tmp_path / "stopped" / "checkpoint.eqx", like
    )
    assert iteration == iterations and np.isfinite(w)
    assert history["loss"] == metrics["loss"]
    if cause in ("interrupted", "signalled"):
        monkeypatch.undo()
        loss_fn = _grow  # the same losses, without a signal
        full = _scalar_fit(tmp_path / "full", loss_fn, lr, niters=5)
        resumed = neuralode.fit(
            loss_fn,
            jnp.array(1.0),
            optax.sgd(lr),
            lambda key: None,
            niters=5,
            key=jax.random.PRNGKey(0),
            out_dir=tmp_path / "stopped",
            resume=True,
            progress=False,
        )
        assert resumed.metrics["loss"] == full.metrics["loss"]


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


def _parser(out):
    parser = argparse.ArgumentParser(prog="example")
    return neuralode.add_training_arguments(
        parser, niters=10, batch_size=4, lr=1e-3, steps=7, out=str(out)
    )


def test_cli_defaults_and_building(tmp_path):
    args = neuralode.parse_training_args(_parser(tmp_path), [])
    assert (args.steps, args.rtol, args.atol, args.niters) == (7, None, None, 10)
    assert args.adjoint == "symplectic" and args.solver == "tsit5"
    controller, dt0, max_steps = neuralode.stepping_from_args(args, 1.4)
    assert isinstance(controller, diffrax.ConstantStepSize)
    assert dt0 == pytest.approx(0.2) and max_steps == 8

    args = neuralode.parse_training_args(
        _parser(tmp_path), ["--rtol", "1e-4", "--max-steps", "9"]
    )
    assert args.atol == 1e-4 and args.steps is None
    controller, dt0, max_steps = neuralode.stepping_from_args(args, 1.0)
    assert isinstance(controller, diffrax.PIDController) and dt0 is None
    assert max_steps == 9
    for name in neuralode.ADJOINT_NAMES:
        args = neuralode.parse_training_args(_parser(tmp_path), ["--adjoint", name])
        assert isinstance(neuralode.adjoint_from_args(args), diffrax.AbstractAdjoint)
    for name, cls in neuralode.SOLVERS.items():
        assert type(neuralode.solver_from_name(name)) is cls
    config = neuralode.run_config(
        neuralode.parse_training_args(
            _parser(tmp_path), ["--overwrite", "--seed", "3"]
        ),
        ignore=("seed",),
    )
    assert "overwrite" not in config and "niters" not in config
    assert "seed" not in config and config["lr"] == 1e-3
    assert set(neuralode.RESUME_MAY_CHANGE) <= set(config)


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
        (["--max-steps", "9"], "bounds adaptive steps"),
        (["--steps", "4", "--max-steps", "9"], "bounds adaptive steps"),
        (["--resume", "--overwrite"], "--overwrite replaces it"),
        (["--resume"], "no checkpoint to resume from"),
    ],
)
def test_cli_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        neuralode.parse_training_args(_parser(tmp_path), argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_keeps_the_checkpoints_options(tmp_path):
    first = ["--lr", "0.01", "--batch-size", "8", "--rtol", "1e-4", "--adjoint"]
    args = neuralode.parse_training_args(_parser(tmp_path), first + ["backprop"])
    like = (jnp.zeros(2),)
    history = {"loss": [], "time_s": [], "nfe": []}
    neuralode.save_checkpoint(
        tmp_path / "checkpoint.eqx", like, 0, neuralode.run_config(args), history
    )

    def resumed(*argv):
        return neuralode.parse_training_args(_parser(tmp_path), ["--resume", *argv])

    args = resumed()  # a plain --resume continues the same run
    assert (args.lr, args.batch_size, args.adjoint) == (0.01, 8, "backprop")
    assert (args.steps, args.rtol, args.atol, args.max_steps) == (
        None,
        1e-4,
        1e-4,
        1024,
    )
    args = resumed("--lr", "0.001", "--max-steps", "9")
    assert (args.lr, args.batch_size, args.rtol, args.max_steps) == (1e-3, 8, 1e-4, 9)
    args = resumed("--steps", "5")  # the step control is replaced as a whole
    assert (args.steps, args.rtol, args.atol, args.max_steps) == (5, None, None, None)

    # Older checkpoints stored the default max_steps with constant steps too.
    config = neuralode.run_config(
        neuralode.parse_training_args(_parser(tmp_path), ["--overwrite"])
    )
    config["max_steps"] = 1024
    neuralode.save_checkpoint(tmp_path / "checkpoint.eqx", like, 0, config, history)
    args = resumed()
    assert (args.steps, args.rtol, args.max_steps) == (7, None, None)


def test_cli_exits_cleanly_on_sigterm_and_errors(capsys):
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        with neuralode.exit_on_training_error():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
    assert e.value.code == 130 and "stopped: terminated" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is previous
    with pytest.raises(SystemExit) as e:
        with neuralode.exit_on_training_error():
            raise neuralode.TrainingStopped("iteration 3 failed: ... `max_steps`.")
    assert e.value.code == 1 and "raise --max-steps" in capsys.readouterr().err
