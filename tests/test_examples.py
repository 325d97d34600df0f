"""The example scripts, run in-process through their `main(argv)` on tiny problems:
every option is wired, exact strategies give the same loss curve, resume continues
exactly, bad checkpoints and divergence give clear errors."""

import argparse
import functools
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import sys
import time

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neuralode
import neuralode.training as training

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))  # as when a script runs: its folder comes first

import _common  # noqa: E402

TINY_SPIRAL = [
    "--num-times",
    "40",
    "--window",
    "4",
    "--width",
    "8",
    "--batch-size",
    "4",
    "--no-progress",
]
# Euler with few steps: coarse enough that the continuous adjoint's gradient (of the
# ODE, not of the discretisation) visibly differs from the exact ones.
COARSE = ["--solver", "euler", "--steps", "3"]
EXACT = ("backprop", "symplectic")


@functools.cache
def example(name):
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spiral(*argv):
    return example("spiral").main(TINY_SPIRAL + [str(a) for a in argv])


@pytest.fixture(scope="module")
def spiral_runs(tmp_path_factory):
    runs = {}
    for adjoint in ("backprop", "symplectic", "continuous"):
        out = tmp_path_factory.mktemp(adjoint)
        metrics = spiral(
            *COARSE,
            "--niters",
            6,
            "--checkpoint-every",
            2,
            "--adjoint",
            adjoint,
            "--out",
            out,
        )
        runs[adjoint] = (out, metrics)
    return runs


def test_spiral_outputs(spiral_runs):
    out, metrics = spiral_runs["backprop"]
    with open(out / "metrics.json") as f:
        written = json.load(f)
    assert written["adjoint"] == "backprop" and written["solver"] == "euler"
    for name in ("loss", "time_s", "nfe"):
        assert len(written[name]) == 6
    assert written["nfe"] == [3] * 6  # Euler, 3 steps
    assert written["memory_bytes"] > 0 and np.isfinite(written["trajectory_mae"])
    for name in ("checkpoint.eqx", "loss.png", "spiral.png"):
        assert (out / name).stat().st_size > 0


def test_exact_strategies_give_the_same_losses(spiral_runs):
    reference = spiral_runs["backprop"][1]["loss"]
    for adjoint in EXACT:
        np.testing.assert_allclose(
            spiral_runs[adjoint][1]["loss"], reference, rtol=1e-5
        )
    continuous = spiral_runs["continuous"][1]["loss"]
    assert continuous[0] == pytest.approx(reference[0], rel=1e-12)  # same forward
    np.testing.assert_allclose(continuous, reference, rtol=0.05)
    assert not np.allclose(continuous[1:], reference[1:], rtol=1e-6, atol=0)


def test_checkpoints_and_auto_give_the_same_losses(spiral_runs, tmp_path, capsys):
    reference = spiral_runs["backprop"][1]["loss"]
    common = [*COARSE, "--niters", 6, "--checkpoint-every", 6]
    one = spiral(*common, "--checkpoints", 1, "--out", tmp_path / "one")
    np.testing.assert_allclose(one["loss"], reference, rtol=1e-5)
    # A budget no full-storage gradient fits: a symplectic one is chosen, on the
    # training step itself, and its table printed.
    auto = spiral(
        *common, "--adjoint", "auto", "--memory-budget", "8KiB", "--out", tmp_path
    )
    printed = capsys.readouterr().out
    assert "chosen: symplectic" in printed and "backprop" in printed, printed
    assert auto["adjoint"].startswith("symplectic")
    np.testing.assert_allclose(auto["loss"], reference, rtol=1e-5)


def test_reversible_wraps_the_solver(tmp_path, capsys):
    metrics = spiral(
        *COARSE, "--niters", 2, "--adjoint", "reversible", "--out", tmp_path
    )
    assert "solving with neuralode.Reversible(Euler(), coupling=" in (
        capsys.readouterr().out
    )
    assert metrics["nfe"] == [6, 6]  # two Euler steps per step, 3 steps
    assert np.all(np.isfinite(metrics["loss"]))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--adjoint", "backprop", "--checkpoints", "2"], "symplectic only"),
        (["--checkpoints", "0"], "positive integer or all"),
        (["--adjoint", "auto"], "needs --memory-budget"),
        (["--memory-budget", "1GiB"], "needs --memory-budget, which only it takes"),
    ],
)
def test_bad_strategy_options(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        spiral(*argv, "--out", tmp_path)
    assert message in capsys.readouterr().err


def test_resume_gives_the_same_losses(spiral_runs, tmp_path, monkeypatch):
    saved = []
    save = training.Checkpoint.save
    monkeypatch.setattr(
        training.Checkpoint,
        "save",
        lambda checkpoint, path: (
            saved.append(checkpoint.iteration),
            save(checkpoint, path),
        ),
    )
    first = spiral(
        *COARSE,
        "--niters",
        3,
        "--checkpoint-every",
        2,
        "--adjoint",
        "backprop",
        "--out",
        tmp_path,
    )
    assert saved == [2, 3] and len(first["loss"]) == 3
    resumed = spiral(
        *COARSE,
        "--niters",
        6,
        "--checkpoint-every",
        2,
        "--resume",
        "--adjoint",
        "backprop",
        "--out",
        tmp_path,
    )
    full = spiral_runs["backprop"][1]
    assert resumed["loss"] == full["loss"]
    assert resumed["nfe"] == full["nfe"] and len(resumed["time_s"]) == 6


def test_bad_checkpoints_are_refused_and_kept(spiral_runs, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(spiral_runs["backprop"][0], out)
    path = out / "checkpoint.eqx"
    good = path.read_bytes()

    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(SystemExit) as e:
        spiral(
            *COARSE, "--niters", 8, "--resume", "--adjoint", "backprop", "--out", out
        )
    assert e.value.code == 1 and "corrupt" in capsys.readouterr().err
    assert path.read_bytes() == good[: len(good) // 2]

    path.write_bytes(good)
    with pytest.raises(SystemExit) as e:
        spiral(
            *COARSE,
            "--niters",
            8,
            "--resume",
            "--adjoint",
            "backprop",
            "--width",
            9,
            "--out",
            out,
        )
    err = capsys.readouterr().err
    assert e.value.code == 1 and "different configuration" in err and "width" in err
    assert path.read_bytes() == good

    with pytest.raises(SystemExit) as e:  # found while parsing, before any work
        spiral(*COARSE, "--resume", "--out", tmp_path / "empty")
    assert e.value.code == 2 and "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize(
    "flag, value, first_loss_changes",
    [("--lr", 0.3, False), ("--seed", 1, True), ("--batch-size", 3, True)],
)
def test_flags_change_the_run(spiral_runs, tmp_path, flag, value, first_loss_changes):
    reference = spiral_runs["backprop"][1]["loss"]
    argv = TINY_SPIRAL + [
        *COARSE,
        "--niters",
        "2",
        "--adjoint",
        "backprop",
        "--out",
        str(tmp_path),
        flag,
        str(value),
    ]
    losses = example("spiral").main(argv)["loss"]
    assert (losses[0] != reference[0]) == first_loss_changes
    assert losses[1] != reference[1]


def test_spiral_adaptive_steps_and_progress_bar(tmp_path, capsys):
    metrics = example("spiral").main(
        TINY_SPIRAL[:-1]
        + [
            "--solver",
            "dopri5",
            "--rtol",
            "1e-3",
            "--atol",
            "1e-5",
            "--max-steps",
            "32",
            "--niters",
            "2",
            "--adjoint",
            "symplectic",
            "--out",
            str(tmp_path),
        ]
    )
    assert all(n > 0 and (n - 1) % 6 == 0 for n in metrics["nfe"])  # FSAL: 6 per step
    err = capsys.readouterr().err
    assert "nfe=" in err and "s_it=" in err and "loss=" in err


def test_spiral_nan_stops_with_last_good_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        spiral(
            *COARSE,
            "--lr",
            "1e300",
            "--niters",
            50,
            "--checkpoint-every",
            1,
            "--adjoint",
            "backprop",
            "--out",
            tmp_path,
        )
    assert e.value.code == 1 and "non-finite" in capsys.readouterr().err
    with open(tmp_path / "metrics.json") as f:
        metrics = json.load(f)
    # The first update is finite (Adam's first step is about lr per weight), the
    # solve from it overflows: training stops after one iteration, checkpointed.
    assert "non-finite" in metrics["stopped"] and len(metrics["loss"]) == 1
    header = (tmp_path / "checkpoint.eqx").read_bytes().split(b"\n")[1]
    assert json.loads(header)["iteration"] == 1


@pytest.mark.parametrize("script", ["spiral", "physics"])
def test_argument_errors(script, capsys):
    for argv in (
        ["--niters", "-1"],
        ["--steps", "4", "--rtol", "1e-3"],
        ["--solver", "rk45"],
        ["--window", "1"],
    ):
        with pytest.raises(SystemExit) as e:
            example(script).main(argv)
        assert e.value.code == 2
        assert "error:" in capsys.readouterr().err
    assert (
        example(script).build_parser().parse_args([]).adjoint in neuralode.ADJOINT_NAMES
    )


TINY_CNF = [
    "--niters",
    "2",
    "--batch-size",
    "8",
    "--num-train",
    "64",
    "--num-test",
    "20",
    "--width",
    "8",
    "--depth",
    "1",
    "--grid",
    "8",
    "--no-progress",
]


@pytest.mark.parametrize(
    "argv",
    [
        [
            "--density",
            "moons",
            "--solver",
            "heun",
            "--steps",
            "2",
            "--adjoint",
            "backprop",
        ],
        [
            "--density",
            "circles",
            "--hutchinson",
            "--solver",
            "bosh3",
            "--rtol",
            "1e-2",
            "--max-steps",
            "16",
            "--adjoint",
            "symplectic",
        ],
    ],
)
def test_cnf(argv, tmp_path):
    metrics = example("cnf").main(TINY_CNF + argv + ["--out", str(tmp_path)])
    assert len(metrics["loss"]) == 2 and np.isfinite(metrics["test_nll"])
    assert np.isfinite(metrics["gaussian_nll"])
    assert metrics["hutchinson"] == ("--hutchinson" in argv)
    for name in ("metrics.json", "checkpoint.eqx", "loss.png", "cnf.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_cnf_argument_errors(capsys):
    for argv in (["--density", "swissroll"], ["--grid", "0"], ["--lr", "-1"]):
        with pytest.raises(SystemExit) as e:
            example("cnf").main(argv)
        assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_physics(tmp_path):
    metrics = example("physics").main(
        [
            "--niters",
            "2",
            "--num-trajectories",
            "3",
            "--num-times",
            "12",
            "--window",
            "4",
            "--width",
            "8",
            "--depth",
            "1",
            "--batch-size",
            "4",
            "--steps",
            "2",
            "--solver",
            "ralston",
            "--adjoint",
            "continuous",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    assert metrics["adjoint"] == "continuous" and np.isfinite(metrics["rollout_mae"])
    assert metrics["nfe"] == [4, 4]  # Ralston: 2 stages, 2 steps
    for name in ("metrics.json", "checkpoint.eqx", "loss.png", "physics.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_compare_adjoints_table(tmp_path):
    table = example("compare_adjoints").main(
        [
            "--niters",
            "2",
            "--adjoints",
            "backprop",
            "symplectic",
            "--out",
            str(tmp_path),
            "--",
            *TINY_SPIRAL,
            *COARSE,
        ]
    )
    lines = table.splitlines()
    device = jax.devices()[0]
    if device.platform == "cpu":
        assert f"; {len(os.sched_getaffinity(0))}-core CPU (" in lines[0]
    else:
        assert device.device_kind in lines[0] and "CPU" not in lines[0]
    assert lines[2].startswith("| strategy |")
    assert [line.split("|")[1].strip() for line in lines[4:]] == [
        "`backprop`",
        "`symplectic`",
    ]
    assert (tmp_path / "symplectic" / "metrics.json").exists()


# The options every example shares (examples/_common.py).


def _parser(out):
    parser = argparse.ArgumentParser(prog="example")
    return _common.add_training_arguments(
        parser, niters=10, batch_size=4, lr=1e-3, steps=7, out=str(out)
    )


def test_cli_defaults_and_building(tmp_path):
    args = _common.parse_training_args(_parser(tmp_path), [])
    assert (args.steps, args.rtol, args.atol, args.niters) == (7, None, None, 10)
    assert args.adjoint == "symplectic" and args.solver == "tsit5"
    controller, dt0, max_steps = _common.stepping_from_args(args, 1.4)
    assert isinstance(controller, diffrax.ConstantStepSize)
    assert dt0 == pytest.approx(0.2) and max_steps == 8

    args = _common.parse_training_args(
        _parser(tmp_path), ["--rtol", "1e-4", "--max-steps", "9"]
    )
    assert args.atol == 1e-4 and args.steps is None
    controller, dt0, max_steps = _common.stepping_from_args(args, 1.0)
    assert isinstance(controller, diffrax.PIDController) and dt0 is None
    assert max_steps == 9
    for name in neuralode.ADJOINT_NAMES:
        args = _common.parse_training_args(_parser(tmp_path), ["--adjoint", name])
        assert isinstance(_common.adjoint_from_args(args), diffrax.AbstractAdjoint)
    for name, cls in _common.SOLVERS.items():
        assert type(_common.solver_from_name(name)) is cls
    config = _common.run_config(
        _common.parse_training_args(_parser(tmp_path), ["--overwrite", "--seed", "3"]),
        ignore=("seed",),
    )
    assert "overwrite" not in config and "niters" not in config
    assert "seed" not in config and config["lr"] == 1e-3
    assert set(_common.RESUME_MAY_CHANGE) <= set(config)


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
        _common.parse_training_args(_parser(tmp_path), argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_keeps_the_checkpoints_options(tmp_path):
    first = ["--lr", "0.01", "--batch-size", "8", "--rtol", "1e-4", "--adjoint"]
    args = _common.parse_training_args(_parser(tmp_path), first + ["backprop"])
    like = (jnp.zeros(2),)
    history = {"loss": [], "time_s": [], "nfe": []}
    training.Checkpoint(like, 0, _common.run_config(args), history).save(
        tmp_path / "checkpoint.eqx"
    )

    def resumed(*argv):
        return _common.parse_training_args(_parser(tmp_path), ["--resume", *argv])

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
    config = _common.run_config(
        _common.parse_training_args(_parser(tmp_path), ["--overwrite"])
    )
    config["max_steps"] = 1024
    training.Checkpoint(like, 0, config, history).save(tmp_path / "checkpoint.eqx")
    args = resumed()
    assert (args.steps, args.rtol, args.max_steps) == (7, None, None)


def test_cli_exits_cleanly_on_sigterm_and_errors(capsys):
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        with _common.exit_on_training_error():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
    assert e.value.code == 130 and "stopped: terminated" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is previous
    with pytest.raises(SystemExit) as e:
        with _common.exit_on_training_error():
            raise training.TrainingStopped("iteration 3 failed: ... `max_steps`.")
    assert e.value.code == 1 and "raise --max-steps" in capsys.readouterr().err
