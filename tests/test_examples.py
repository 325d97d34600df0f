"""The example scripts, run in-process through their `main(argv)` on tiny problems:
every option is wired, exact strategies give the same loss curve, resume continues
exactly, bad checkpoints and divergence give clear errors."""

import functools
import importlib.util
import json
import pathlib
import shutil

import numpy as np
import pytest

import neuralode
import neuralode._train as train_module

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
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


def test_resume_gives_the_same_losses(spiral_runs, tmp_path, monkeypatch):
    saved = []
    save = train_module.save_checkpoint
    monkeypatch.setattr(
        train_module,
        "save_checkpoint",
        lambda path, state, iteration, *a: (
            saved.append(iteration),
            save(path, state, iteration, *a),
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
    assert "non-finite" in metrics["stopped"] and len(metrics["loss"]) < 50
    if metrics["loss"]:
        header = (tmp_path / "checkpoint.eqx").read_bytes().split(b"\n")[1]
        assert json.loads(header)["iteration"] == len(metrics["loss"])


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
    assert "-core CPU" in lines[0]
    assert lines[2].startswith("| strategy |")
    assert [line.split("|")[1].strip() for line in lines[4:]] == [
        "`backprop`",
        "`symplectic`",
    ]
    assert (tmp_path / "symplectic" / "metrics.json").exists()
