"""Data parallel scaling of the CNF example (`examples/cnf.py`): time per iteration and
per-device memory against the number of devices, for every strategy.

For each strategy and each number of devices d (1, 2, 4, ... up to the devices of the
host), the example trains on d devices (`--devices d`) with the same global batch.
Time per iteration is the median over the iterations after the first of `metrics.json`'s
`time_s`; memory is XLA's static temp bytes of the compiled training step per device
(`memory_bytes`). Beside each d > 1, one device trains on the batch of one of the d
devices (batch / d): where data parallelism splits everything that depends on the
batch, the two memories are equal, and the memory at d devices is that at one device
divided by d, less the part that does not depend on the batch (the parameters, their
gradient and the optimiser state).

    python benchmarks/scaling.py [--quick] [--host-devices N] [--out DIR]

writes DIR/scaling.json and DIR/scaling.md. On a CPU, `--host-devices N` (default 4)
splits the host into N XLA devices (XLA_FLAGS=--xla_force_host_platform_device_count=N,
set before JAX is imported). They share the host's cores, so on a CPU the times show
that the partitioned step runs, not a speed-up; on a host with several GPUs the devices
are the GPUs (on one GPU there is only the 1-device row).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {
    "full": dict(batch=256, width=64, depth=3, steps=8, niters=12),
    "quick": dict(batch=64, width=32, depth=2, steps=4, niters=6),
}
# The held-out evaluation and the plots after training are not measured: keep them small.
EVALUATION = ["--num-train", "4096", "--num-test", "64", "--grid", "8"]


def run_example(cnf, strategy: str, devices: int, batch: int, size: dict) -> dict:
    """One training run of the CNF example; its figures."""
    with tempfile.TemporaryDirectory() as out:
        argv = [
            *EVALUATION,
            *("--adjoint", strategy, "--devices", str(devices)),
            *("--batch-size", str(batch), "--width", str(size["width"])),
            *("--depth", str(size["depth"]), "--steps", str(size["steps"])),
            *("--niters", str(size["niters"]), "--no-progress", "--out", out),
        ]
        metrics = cnf.main(argv)
    return dict(
        strategy=strategy,
        devices=devices,
        batch=batch,
        ms=1e3 * statistics.median(metrics["time_s"][1:]),
        temp_bytes=metrics["memory_bytes"],
        compile_s=metrics["compile_s"],
        loss=metrics["loss"],
    )


def measure(strategies, device_counts, size: dict) -> list[dict]:
    import cnf

    rows = []
    for strategy in strategies:
        for devices in device_counts:
            rows.append(run_example(cnf, strategy, devices, size["batch"], size))
            if devices > 1:
                batch = size["batch"] // devices
                rows.append(run_example(cnf, strategy, 1, batch, size))
            print(rows[-1] if devices == 1 else rows[-2:], flush=True)
    return rows


def checks(result: dict) -> list[str]:
    """What the figures say, each with the numbers behind it."""
    rows = {(r["strategy"], r["devices"], r["batch"]): r for r in result["rows"]}
    batch = result["size"]["batch"]
    lines = []
    for strategy in result["strategies"]:
        one = rows[strategy, 1, batch]
        for d in result["device_counts"][1:]:
            many, share = rows[strategy, d, batch], rows[strategy, 1, batch // d]
            pairs = zip(many["loss"], one["loss"], strict=True)
            drift = max(abs(a - b) / abs(b) for a, b in pairs)
            lines.append(
                f"{strategy}, {d} devices: memory per device / one device's "
                f"{many['temp_bytes'] / one['temp_bytes']:.2f} (1/{d} = {1 / d:.2f}), "
                f"/ one device's with batch {batch // d} "
                f"{many['temp_bytes'] / share['temp_bytes']:.2f} (target ≤ 1.1); "
                f"time per iteration / one device's {many['ms'] / one['ms']:.2f}; "
                f"loss curve vs one device's: {drift:.1e} relative (target ≤ 1e-5)"
            )
    return lines


def render(result: dict, out: str) -> None:
    kib = 2**10
    size = result["size"]
    lines = [
        f"# Data parallel scaling of the CNF example ({result['device']})",
        "",
        f"`python benchmarks/scaling.py{' --quick' if result['quick'] else ''}`, "
        f"jax {result['jax']}. `examples/cnf.py` with Tsit5, {size['steps']} constant "
        f"steps, MLP width {size['width']}, depth {size['depth']}, global batch "
        f"{size['batch']}, float32, {size['niters']} iterations; time is the median "
        "time per iteration after the first, memory XLA's static temp bytes of the "
        "compiled training step per device."
        + (
            " The devices share the host's cores: the times show that the "
            "partitioned step runs, not a speed-up."
            if "forced host devices" in result["device"]
            else ""
        ),
        "",
        "| strategy | devices | batch per device | time per iteration (ms) | "
        "memory per device (KiB) |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        d = r["devices"]
        lines.append(
            f"| {r['strategy']} | {d} | {r['batch'] // d} | {r['ms']:.1f} | "
            f"{r['temp_bytes'] / kib:.1f} |"
        )
    lines += ["", "## Checks", ""] + [f"- {line}" for line in result["checks"]]
    with open(os.path.join(out, "scaling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument(
        "--host-devices",
        type=int,
        default=4,
        help="XLA devices a CPU host is split into (default: 4)",
    )
    parser.add_argument("--out", default="benchmarks/results/cpu")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md")
    return parser.parse_args(argv)


def main(argv=None):
    args = _parse(argv)
    if args.render:
        with open(os.path.join(args.out, "scaling.json")) as f:
            result = json.load(f)
        result["checks"] = checks(result)
        render(result, args.out)
        return result
    # Before JAX is imported: it reads the flags once.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={args.host_devices}"
    )
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import jax

    import neuralode

    device = jax.devices()[0]
    count = jax.local_device_count()
    name = (
        f"{len(os.sched_getaffinity(0))}-core CPU, {count} forced host devices"
        if device.platform == "cpu"
        else f"{count} × {device.device_kind}"
    )
    device_counts = [d for d in (1, 2, 4, 8, 16) if d <= count]
    size = SIZES["quick" if args.quick else "full"]
    result = dict(
        device=name,
        jax=jax.__version__,
        python=platform.python_version(),
        quick=args.quick,
        size=size,
        strategies=list(neuralode.ADJOINT_NAMES),
        device_counts=device_counts,
        rows=measure(neuralode.ADJOINT_NAMES, device_counts, size),
    )
    result["checks"] = checks(result)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scaling.json"), "w") as f:
        json.dump(result, f, indent=1)
    render(result, args.out)
    print("\n".join(result["checks"]))
    return result


if __name__ == "__main__":
    main()
