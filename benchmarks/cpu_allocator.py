"""What glibc's allocator costs large gradients on a CPU.

XLA's CPU runtime allocates a program's temporary buffers at every call and frees them
at its end. glibc serves an allocation above its mmap threshold (at most 32 MiB unless
set) with a fresh mapping and unmaps it on free, so every call faults every page of its
temporaries in again, and the kernel zeroes each one: a cost that follows the memory,
not the arithmetic. It hits the strategies with large temporaries (backprop, whose
storage follows `max_steps`); GPUs are unaffected (XLA keeps a pool there).

This script times the gradient of the 3-step adaptive solve of
`benchmarks/checkpoints.py` (MLP 32 → 128 → 128 → 32, batch 256, Tsit5, PID 1e-5) under
backprop at `max_steps=128` and `RecursiveCheckpointAdjoint()`, in two fresh processes:
glibc's defaults, and with the allocator told to keep freed memory
(`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, read by glibc at start-up), and
counts the page faults per call.

    python benchmarks/cpu_allocator.py --out benchmarks/results/cpu
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
KEEP_FREED_MEMORY = {
    "MALLOC_MMAP_THRESHOLD_": str(2**32),  # serve allocations from the heap ...
    "MALLOC_TRIM_THRESHOLD_": str(2**36),  # ... and do not give it back
}
REPEATS = 15


def worker() -> dict:
    """Runs in the child: median ms and page faults per call of each gradient."""
    sys.path.insert(0, HERE)
    import checkpoints
    import diffrax
    import jax
    import numpy as np

    import neuralode

    (params, static), y0 = checkpoints.problem(128, 256)
    pid = diffrax.PIDController(rtol=1e-5, atol=1e-5)
    fns = {
        "backprop": neuralode.BackpropAdjoint(),
        "RecursiveCheckpointAdjoint()": diffrax.RecursiveCheckpointAdjoint(),
    }
    fns = {
        name: checkpoints.gradient(adjoint, static, max_steps=128, controller=pid)
        for name, adjoint in fns.items()
    }
    out = {}
    for fn in fns.values():  # compile, then touch the memory once more
        jax.block_until_ready(fn(params, y0))
        jax.block_until_ready(fn(params, y0))
    times = {name: [] for name in fns}
    faults = dict.fromkeys(fns, 0)
    for _ in range(REPEATS):  # interleaved
        for name, fn in fns.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            tic = time.perf_counter()
            jax.block_until_ready(fn(params, y0))
            times[name].append(1e3 * (time.perf_counter() - tic))
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    for name in fns:
        out[name] = dict(
            ms=float(np.median(times[name])),
            iqr_ms=float(np.subtract(*np.percentile(times[name], [75, 25]))),
            faults_per_call=faults[name] / REPEATS,
            temp_bytes=checkpoints.temp_bytes(fns[name], params, y0),
        )
    return out


def run(env_changes: dict) -> dict:
    env = dict(os.environ, **env_changes)
    proc = subprocess.run(
        [sys.executable, __file__, "--worker"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render(result: dict) -> str:
    lines = [
        f"# glibc's allocator and large gradients ({result['device']})",
        "",
        "3-step adaptive solve (MLP 32-128-128-32, batch 256, Tsit5, PID 1e-5), "
        "gradient at max_steps=128; median of "
        f"{REPEATS} interleaved calls per process.",
        "",
        "| allocator | strategy | temp (MiB) | time (ms) | page faults per call | "
        "× RecursiveCheckpointAdjoint() |",
        "|---|---|---|---|---|---|",
    ]
    for setting, rows in result["settings"].items():
        reference = rows["RecursiveCheckpointAdjoint()"]["ms"]
        for name, r in rows.items():
            lines.append(
                f"| {setting} | {name} | {r['temp_bytes'] / 2**20:.1f} | "
                f"{r['ms']:.1f} (IQR {r['iqr_ms']:.1f}) | {r['faults_per_call']:.0f} | "
                f"{r['ms'] / reference:.1f} |"
            )
    env = " ".join(f"{k}={v}" for k, v in KEEP_FREED_MEMORY.items())
    lines += [
        "",
        f"'keeps freed memory' is `{env}` in the environment.",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="folder for cpu_allocator.json and .md")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker()))
        return
    result = dict(
        device=f"{os.cpu_count()}-core CPU",  # a CPU-only script; JAX only in its workers
        command="python benchmarks/cpu_allocator.py",
        settings={
            "glibc's defaults": run({}),
            "keeps freed memory": run(KEEP_FREED_MEMORY),
        },
    )
    text = render(result)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cpu_allocator.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "cpu_allocator.md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
