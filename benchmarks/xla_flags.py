"""Float32 gradient error of one configuration under several `XLA_FLAGS` settings.

On a GPU, XLA's GEMM autotuner picks among matrix-product kernels at compile time, and
its choice can change the rounding of a product even at
`jax_default_matmul_precision="highest"`. This script separates that effect from a
strategy's own error: each (setting, strategy) runs in a fresh process, with the same
problem, sizes and float64 reference as `report.py`, and reports the relative error of
each gradient leaf [W1, b1, W2, b2, ..., y0].

    python benchmarks/xla_flags.py [--width 32] [--n-steps 64] [--out FILE.json]
    python benchmarks/xla_flags.py --summary FILE.json   # the README's sentence

On a CPU every setting gives the same numbers (the flags are GPU flags).
"""

import argparse
import concurrent.futures
import json
import os
import time

from reporting.measure_jax import Measurer
from reporting.problems import SIZES, plan
from reporting.script import device_name
from reporting.solve import config_gradient, flat_grads
from reporting.workers import run_worker, worker_env

SETTINGS = {
    "default": "",
    "autotune off": "--xla_gpu_autotune_level=0",
    "no Triton GEMM": "--xla_gpu_enable_triton_gemm=false",
}
STRATEGIES = ("backprop", "continuous", "symplectic", "diffrax_rca_n")
WORKER_TIMEOUT_S = 300


def config(strategy: str, width: int, n_steps: int) -> dict:
    """The report's full-size problem (batch 256, state 32, Tsit5) at this width and n."""
    base = plan(SIZES["full"])[0]
    return dict(base, strategy=strategy, width=width, n_steps=n_steps)


def worker(c: dict) -> dict:
    """Error of configuration `c` in this process (its XLA_FLAGS already set)."""
    import neuralode.measure

    g, params, y0 = config_gradient(c)
    grads = flat_grads(g(params, y0))
    ref = Measurer([c]).exact_reference(c)
    error = neuralode.measure.relative_error
    return dict(
        grad_rel_error=error(grads, ref),
        leaf_errors=[error(g, r) for g, r in zip(grads, ref, strict=True)],
    )


def measure(width: int, n_steps: int) -> list[dict]:
    """One row per (setting, strategy), each measured in a fresh process."""

    def one(job):
        setting, strategy = job
        c = config(strategy, width, n_steps)
        env = worker_env(
            XLA_FLAGS=SETTINGS[setting], XLA_PYTHON_CLIENT_PREALLOCATE="false"
        )
        deadline = time.perf_counter() + WORKER_TIMEOUT_S
        result, error = run_worker("error", c, env, deadline, script=__file__)
        return dict(c, setting=setting, xla_flags=SETTINGS[setting], error=error) | (
            result or {}
        )

    jobs = [(s, k) for s in SETTINGS for k in STRATEGIES]
    workers = max(1, min(len(jobs), (os.cpu_count() or 2) // 2))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, jobs))


def summary(results: dict) -> str:
    """The README's sentence: `symplectic`'s error in each setting beside `backprop`'s."""
    rows = results["rows"]

    def error(strategy, setting):
        (r,) = [r for r in rows if (r["strategy"], r["setting"]) == (strategy, setting)]
        return r["grad_rel_error"], r

    default, row = error("symplectic", "default")
    weights = row["leaf_errors"][0:-1:2]  # [W1, b1, W2, ..., y0]: the weight leaves
    backprop = [error("backprop", s)[0] for s in SETTINGS]
    return (
        f"On the {results['device']} at width {row['width']} and n = {row['n_steps']}, "
        f"`symplectic`'s float32 error is {default:.1e} with default flags (its weight "
        f"leaves {min(weights):.1e} to {max(weights):.1e}), "
        f"{error('symplectic', 'autotune off')[0]:.1e} with the GEMM autotuner off "
        f"(`{SETTINGS['autotune off']}`) and "
        f"{error('symplectic', 'no Triton GEMM')[0]:.1e} with Triton GEMMs off "
        f"(`{SETTINGS['no Triton GEMM']}`), beside `backprop`'s {min(backprop):.1e} to "
        f"{max(backprop):.1e} in every setting (`python benchmarks/xla_flags.py`)."
    )


def print_table(rows: list[dict], device: str, jax_version: str, width, n_steps):
    print(
        f"{device}, jax {jax_version}; d={width}, n={n_steps}, float32 vs float64 "
        "backprop"
    )
    print(f"{'setting':16s} {'strategy':14s} {'error':>8s}  leaves")
    for r in rows:
        leaves = " ".join(f"{e:.1e}" for e in r.get("leaf_errors", []))
        err = r.get("grad_rel_error")
        err = f"{err:8.1e}" if err is not None else f"failed: {r['error']}"
        print(f"{r['setting']:16s} {r['strategy']:14s} {err}  {leaves}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--n-steps", type=int, default=64)
    parser.add_argument("--out", help="also write the rows to this JSON file")
    parser.add_argument(
        "--summary", metavar="FILE", help="print FILE's README sentence"
    )
    parser.add_argument("--error-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.error_worker:
        print("RESULT " + json.dumps(worker(json.loads(args.error_worker))))
        return
    if args.summary:
        with open(args.summary) as f:
            print(summary(json.load(f)))
        return
    rows = measure(args.width, args.n_steps)
    import jax

    device = device_name()
    print_table(rows, device, jax.__version__, args.width, args.n_steps)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=device, jax=jax.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
