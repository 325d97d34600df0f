"""Data parallel training of the examples (`--devices`, and `--coordinator`,
`--num-processes`, `--process-id` for several processes), on host (CPU) devices forced
in worker processes (`tests/data_parallel_worker.py`): on 4 devices the loss curve is
that of one device for every strategy, on two processes of 2 devices each that of one
process with 4, checkpoints resume on another number of devices, only process 0
writes, and the compiled step all-reduces but never all-gathers: each device keeps only
its share of the batch, and needs the memory of one device given that share alone."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("data_parallel_worker.py")
STRATEGIES = ("backprop", "symplectic", "continuous")
# A batch large enough that the step's memory depends mostly on it.
COMMON = ["--solver", "euler", "--steps", "2", "--batch-size", "256", "--no-progress"]
COMMON += ["--niters", "4", "--checkpoint-every", "2", "--width", "8", "--window", "4"]
ARGV = {
    "spiral": COMMON + ["--num-times", "40"],
    "physics": COMMON
    + ["--num-trajectories", "3", "--num-times", "12", "--depth", "1"],
}
RTOL = 1e-5  # float32, sums over the batch in another order


def _start(spec: dict, directory: pathlib.Path, env: dict | None = None):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, str(WORKER), "spec.json", "results.json"]
    return subprocess.Popen(
        command,
        cwd=directory,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _results(workers: list[tuple[subprocess.Popen, pathlib.Path]]) -> list[list]:
    """Wait for all workers (they run at the same time), then read their results."""
    outputs = []
    for process, _ in workers:
        try:
            outputs.append(process.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for other, _ in workers:
                other.kill()
            raise
    for (process, _), output in zip(workers, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
    return [json.loads((d / "results.json").read_text()) for _, d in workers]


def _run(example, adjoint, devices, out, *extra, **options):
    argv = ARGV[example] + ["--adjoint", adjoint, "--devices", str(devices), *extra]
    return {"example": example, "argv": argv + ["--out", str(out)], **options}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Every strategy on 1 and on 4 devices, for each example in a worker of its own
    with 4 host devices (the two at once); then physics's symplectic runs resumed on
    the other number of devices from their checkpoints at iteration 2, spiral with
    bad device options, and last symplectic on one device with a quarter of the
    batch."""
    tmp = tmp_path_factory.mktemp("devices")
    runs = {
        example: [
            _run(example, adjoint, devices, tmp / example / f"{adjoint}{devices}")
            for adjoint in STRATEGIES
            for devices in (1, 4)
        ]
        for example in ARGV
    }
    for devices, resumed_on in ((1, 4), (4, 1)):
        at_2 = tmp / f"symplectic{devices}-at-2"
        copy = {"at": 2, "to": str(at_2 / "checkpoint.eqx")}
        runs["physics"][2 + (devices == 4)]["copy_checkpoint"] = copy
        runs["physics"].append(
            _run("physics", "symplectic", resumed_on, at_2, "--resume")
        )
    runs["spiral"].append(_run("spiral", "backprop", 4, tmp, "--batch-size", "6"))
    runs["spiral"].append(_run("spiral", "backprop", 5, tmp))
    for example in ARGV:
        share = tmp / example / "share"
        runs[example].append(
            _run(example, "symplectic", 1, share, "--batch-size", "64")
        )
    workers = [
        (_start({"host_devices": 4, "runs": r}, tmp / e), tmp / e)
        for e, r in runs.items()
    ]
    spiral, physics = _results(workers)
    return {"spiral": spiral, "physics": physics}


def _curves(results):
    """{(adjoint, devices): run} of the first six runs, as `one_process` orders them."""
    keys = [(a, d) for a in STRATEGIES for d in (1, 4)]
    return dict(zip(keys, results[:6], strict=True))


@pytest.mark.parametrize("example", ARGV)
def test_four_devices_give_the_curve_of_one(one_process, example):
    runs = _curves(one_process[example])
    for adjoint in STRATEGIES:
        one, four = runs[adjoint, 1], runs[adjoint, 4]
        assert (one["devices"], four["devices"]) == (1, 4)
        assert one["processes"] == four["processes"] == 1
        assert len(four["loss"]) == 4
        np.testing.assert_allclose(four["loss"], one["loss"], rtol=RTOL)
        # XLA sums the gradient over the devices, and gathers nothing.
        assert one["collectives"]["all-reduce"] == 0
        assert four["collectives"]["all-reduce"] > 0
        assert four["collectives"]["all-gather"] == 0, adjoint
    assert runs["backprop", 4]["loss"] != runs["continuous", 4]["loss"]


@pytest.mark.parametrize("example", ARGV)
def test_each_device_needs_the_memory_of_its_share_of_the_batch(one_process, example):
    """The symplectic step on 4 devices with a batch of 256 needs, per device, about
    the XLA temp memory of one device with a batch of 64: the batch, the solve and
    the step buffer of the custom VJP stay split along the batch (none is gathered
    whole, which would need about the memory of one device with all 256)."""
    runs = _curves(one_process[example])
    one, four = runs["symplectic", 1], runs["symplectic", 4]
    share = one_process[example][-1]
    assert one["memory_bytes"] > 3 * share["memory_bytes"]  # mostly the batch's
    assert four["memory_bytes"] <= 1.2 * share["memory_bytes"]


def test_checkpoints_resume_on_another_number_of_devices(one_process):
    runs = _curves(one_process["physics"])
    one, four = runs["symplectic", 1], runs["symplectic", 4]
    from_one, from_four = one_process["physics"][6:8]
    assert (from_one["devices"], from_four["devices"]) == (4, 1)
    assert from_one["loss"][:2] == one["loss"][:2]  # the checkpoint's history
    assert from_four["loss"][:2] == four["loss"][:2]
    for resumed in (from_one, from_four):
        np.testing.assert_allclose(resumed["loss"], one["loss"], rtol=RTOL)
        np.testing.assert_allclose(resumed["loss"], four["loss"], rtol=RTOL)


def test_bad_device_options(one_process):
    indivisible, too_many = one_process["spiral"][6:8]
    assert indivisible["exit"] == too_many["exit"] == 2
    assert (
        "--batch-size 6 cannot be split equally over 4 devices"
        in (indivisible["stderr"])
    )
    assert (
        "--devices is 5, but this process has only 4 cpu device(s)"
        in (too_many["stderr"])
    )
    assert "xla_force_host_platform_device_count" in too_many["stderr"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_curve_of_one_with_four_devices(one_process, tmp_path):
    """Spiral's symplectic run on two processes of 2 host devices each, process 1
    given an output directory of its own (where it must write nothing); then both
    resume from the checkpoint process 0 wrote at iteration 2."""
    four = _curves(one_process["spiral"])["symplectic", 4]
    at_2 = tmp_path / "at-2"
    port = _free_port()
    workers = []
    for process, out in enumerate([tmp_path / "run", tmp_path / "not-written"]):
        flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
        flags += ["--process-id", str(process)]
        first = _run("spiral", "symplectic", "all", out, *flags)
        if process == 0:
            first["copy_checkpoint"] = {"at": 2, "to": str(at_2 / "checkpoint.eqx")}
        resumed = _run("spiral", "symplectic", "all", at_2, *flags, "--resume")
        spec = {"host_devices": 2, "runs": [first, resumed]}
        workers.append((_start(spec, tmp_path / str(process)), tmp_path / str(process)))
    (first, resumed), (first_1, resumed_1) = _results(workers)

    assert not (tmp_path / "not-written").exists()
    assert sorted(os.listdir(tmp_path / "run")) == [
        "checkpoint.eqx",
        "loss.png",
        "metrics.json",
        "spiral.png",
    ]
    # The gradients are summed across processes, and the batch is never gathered.
    assert first["collectives"]["all-reduce"] > 0
    assert first["collectives"]["all-gather"] == 0
    for metrics in (first, first_1, resumed, resumed_1):
        assert (metrics["devices"], metrics["processes"]) == (4, 2)
        assert metrics["loss"] == first["loss"]  # one model, trained by both
    np.testing.assert_allclose(first["loss"], four["loss"], rtol=RTOL)
