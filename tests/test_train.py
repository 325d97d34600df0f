"""The training loop: resume gives the same losses, checkpoints are checked, written
atomically and kept however training stops; the train step on its own."""

import json
import math
import os
import signal
import stat
import tempfile

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import neuralode.measure
import neuralode.training as training


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
        return jnp.mean((model(x) - y) ** 2), jnp.array(3)

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
    **options,
):
    model, sample_batch, loss_fn = _problem()
    return training.fit(
        loss_fn,
        model,
        optax.adam(lr),
        sample_batch,
        niters=niters,
        key=jax.random.PRNGKey(0),
        out_dir=out_dir,
        metrics={"nfe": lambda step: int(step.aux)},
        config=config or {"lr": lr},
        may_change=may_change,
        metadata={"adjoint": "none"},
        checkpoint_every=checkpoint_every,
        resume=resume,
        overwrite=overwrite,
        progress=False,
        **options,
    )


def test_metrics_and_resume_equal(tmp_path):
    full = _fit(tmp_path / "full", 6)
    assert full.metrics["loss"][-1] < full.metrics["loss"][0]
    with open(tmp_path / "full" / "metrics.json") as f:
        written = json.load(f)
    for name in ("loss", "time_s", "nfe"):
        assert len(written[name]) == 6
    assert written["nfe"] == [3] * 6 and written["adjoint"] == "none"
    assert written["devices"] == 1 and written["processes"] == 1
    # The compiled step keeps at least the (8, 3) minibatch it draws, in float64.
    assert written["memory_bytes"] >= 8 * 3 * 8
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
    with pytest.raises(training.CheckpointError, match="does not exist"):
        _fit(tmp_path / "new", 2, resume=True)
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(training.CheckpointError, match="file is not a directory"):
        _fit(tmp_path / "file" / "run", 2)

    _fit(tmp_path / "run", 4)
    path = tmp_path / "run" / "checkpoint.eqx"
    good = path.read_bytes()
    # A run started afresh by mistake must not replace a further-along checkpoint.
    with pytest.raises(
        training.CheckpointError, match="already holds a checkpoint at iteration 4"
    ):
        _fit(tmp_path / "run", 2)
    assert path.read_bytes() == good
    assert _fit(tmp_path / "run", 2, overwrite=True).metrics["iterations"] == 2

    # Devices and the batch's axes too (tests/test_devices.py trains on several).
    count = len(jax.local_devices())
    with pytest.raises(ValueError, match=f"this process has only {count} "):
        _fit(tmp_path / "devices", 2, devices=count + 1)
    with pytest.raises(ValueError, match=r"axis 2 for a batch array of shape \(8, 3\)"):
        _fit(tmp_path / "devices", 2, batch_axes=2)
    assert not (tmp_path / "devices").exists()


def test_resume_with_changed_options(tmp_path, capsys):
    _fit(tmp_path, 2)
    with pytest.raises(training.CheckpointError, match="different configuration.*lr"):
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
        with pytest.raises(training.CheckpointError, match="corrupt|not a neuralode"):
            _fit(tmp_path, 4, resume=True)
        assert path.read_bytes() == bad  # not overwritten
    # Same configuration, but a model of another shape.
    path.write_bytes(good)
    like = (jnp.zeros((4, 1)),)
    with pytest.raises(training.CheckpointError, match=r"changed shape from \(4, 1\)"):
        training.Checkpoint.load(path, like)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def _scalar_fit(out_dir, loss_fn, lr, niters=40, metrics=None, resume=False):
    return training.fit(
        loss_fn,
        jnp.array(1.0),
        optax.sgd(lr),
        lambda key: None,
        niters=niters,
        key=jax.random.PRNGKey(0),
        out_dir=out_dir,
        metrics=metrics,
        checkpoint_every=100,  # none periodic: the stop itself must checkpoint
        resume=resume,
        progress=False,
    )


def _grow(w, batch):  # w grows by 1 per iteration of sgd(1.0)
    return eqx.error_if(-w, w > 5.5, "w grew past 5.5"), jnp.array(0)


def _signal_at_3(w, batch):
    jax.debug.callback(
        lambda w: os.kill(os.getpid(), signal.SIGINT) if w == 3 else None, w
    )
    return -w, jnp.array(0)


def _interrupt_at_4(step):
    # Ctrl-C between an iteration's result and its bookkeeping.
    if step.iteration == 4:
        raise KeyboardInterrupt
    return step.loss


def _iterations_before_overflow(lr):
    """Iterations of sgd(lr) on w**2 from w = 1 whose loss and update stay finite."""
    w, done = 1.0, 0
    while math.isfinite(w * w) and math.isfinite(w - lr * (2 * w)):
        w, done = w - lr * (2 * w), done + 1
    return done


@pytest.mark.parametrize(
    "cause, loss_fn, lr, metric, error, message, iterations",
    [
        # Plain gradient descent with a huge step overflows in a few iterations.
        (
            "diverged",
            lambda w, b: (w**2, jnp.array(0)),
            1e10,
            None,
            training.TrainingDiverged,
            "non-finite",
            _iterations_before_overflow(1e10),
        ),
        # A runtime error inside the step, as a solve that reaches max_steps raises.
        (
            "failed",
            _grow,
            1.0,
            None,
            training.TrainingStopped,
            "iteration 6 failed: w grew past 5.5",
            5,
        ),
        # Ctrl-C while the 4th iteration's metrics are recorded.
        (
            "interrupted",
            _grow,
            1.0,
            _interrupt_at_4,
            KeyboardInterrupt,
            "after iteration 3",
            3,
        ),
        # Ctrl-C (a signal) during iteration 3: training stops after it.
        (
            "signalled",
            _signal_at_3,
            1.0,
            None,
            KeyboardInterrupt,
            "after iteration 3",
            3,
        ),
    ],
)
def test_a_stop_checkpoints_the_last_good_state(
    tmp_path, cause, loss_fn, lr, metric, error, message, iterations
):
    metrics = {"m": metric or (lambda step: step.loss)}
    with pytest.raises(error, match=message):
        _scalar_fit(tmp_path / "stopped", loss_fn, lr, metrics=metrics)
    with open(tmp_path / "stopped" / "metrics.json") as f:
        written = json.load(f)
    assert iterations >= 1 and message in written["stopped"]
    assert written["iterations"] == iterations and len(written["m"]) == iterations
    like = (jnp.array(1.0), optax.sgd(lr).init(jnp.array(1.0)), jax.random.PRNGKey(0))
    checkpoint = training.Checkpoint.load(tmp_path / "stopped" / "checkpoint.eqx", like)
    w = checkpoint.state[0]
    assert checkpoint.iteration == iterations and np.isfinite(w)
    assert checkpoint.history["loss"] == written["loss"]
    if cause in ("failed", "interrupted", "signalled"):
        assert float(w) == 1.0 + iterations  # the state after exactly `iterations`
    # Resumed, the run gives the losses of one that never stopped.
    metrics = {"m": lambda step: step.loss}
    full = _scalar_fit(tmp_path / "full", loss_fn, lr, iterations, metrics)
    resumed = _scalar_fit(
        tmp_path / "stopped", loss_fn, lr, iterations, metrics, resume=True
    )
    assert resumed.metrics["loss"] == full.metrics["loss"]
    assert float(resumed.model) == float(full.model)


def test_the_train_step_on_its_own():
    model, sample_batch, loss_fn = _problem()
    optimiser = optax.adam(0.1)
    step = training.make_train_step(loss_fn, optimiser, sample_batch, model)
    state = training.TrainState.init(model, optimiser, jax.random.PRNGKey(0))
    losses = []
    for _ in range(3):
        previous = state
        state, output = step(state)
        losses.append(float(output.loss))
        assert bool(output.finite) and int(output.aux) == 3
        assert previous.params.weight.is_deleted()  # donated to the step
    assert losses[-1] < losses[0]
    assert not model.weight.is_deleted()  # the model's own arrays are copied first
    trained = eqx.combine(state.params, model)
    fitted = training.fit(
        loss_fn,
        model,
        optimiser,
        sample_batch,
        niters=3,
        key=jax.random.PRNGKey(0),
        out_dir=tempfile.mkdtemp(),
        progress=False,
    )
    np.testing.assert_array_equal(trained.weight, fitted.model.weight)
    assert fitted.metrics["loss"] == losses


def test_function_evaluations():
    n = jnp.array(10)
    assert int(neuralode.measure.function_evaluations(diffrax.Euler(), n)) == 10
    assert int(neuralode.measure.function_evaluations(diffrax.Heun(), n)) == 20
    assert int(neuralode.measure.function_evaluations(diffrax.Tsit5(), n)) == 61  # FSAL
    assert int(neuralode.measure.function_evaluations(diffrax.Dopri8(), n)) == 131
    with pytest.raises(ValueError, match="explicit Runge"):
        neuralode.measure.function_evaluations(diffrax.ImplicitEuler(), n)


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
        expected = int(
            neuralode.measure.function_evaluations(solver, sol.stats["num_steps"])
        )
        assert len(calls) == expected
