"""Float32 gradient error of one configuration under several `XLA_FLAGS` settings.

On a GPU, XLA's GEMM autotuner picks among matrix-product kernels at compile time, and
its choice can change the rounding of a product even at
`jax_default_matmul_precision="highest"`. This script separates that effect from a
strategy's own error: each (setting, strategy) runs in a fresh process, with the same
problem, sizes and float64 reference as `report.py`, and reports the relative error of
each gradient leaf [W1, b1, W2, b2, ..., y0].

    python benchmarks/xla_flags.py [--width 32] [--n-steps 64] [--out FILE.json]

On a CPU every setting gives the same numbers (the flags are GPU flags).
"""

import argparse
import concurrent.futures
import json
import os

import report

SETTINGS = {
    "default": "",
    "autotune off": "--xla_gpu_autotune_level=0",
    "no Triton GEMM": "--xla_gpu_enable_triton_gemm=false",
}
STRATEGIES = ("backprop", "continuous", "symplectic", "diffrax_rca_n")


def config(strategy: str, width: int, n_steps: int) -> dict:
    base = next(c for c in report.plan(report.SIZES["full"]) if c["sweep"] == "d")
    return dict(base, strategy=strategy, width=width, n_steps=n_steps)


def worker(c: dict) -> dict:
    """Error of configuration `c` in this process (its XLA_FLAGS already set)."""
    import neuralode.measure

    g, params, y0 = report.config_gradient(c)
    grads = report.flat_grads(g(params, y0))
    ref = report.Measurer(1, [c]).exact_reference(c)
    return dict(
        grad_rel_error=neuralode.measure.relative_error(grads, ref),
        leaf_errors=[
            neuralode.measure.relative_error(g, r)
            for g, r in zip(grads, ref, strict=True)
        ],
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--n-steps", type=int, default=64)
    parser.add_argument("--out", help="also write the rows to this JSON file")
    parser.add_argument("--error-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.error_worker:
        print("RESULT " + json.dumps(worker(json.loads(args.error_worker))))
        return

    def one(job):
        setting, strategy = job
        c = config(strategy, args.width, args.n_steps)
        env = report._env(
            XLA_FLAGS=SETTINGS[setting], XLA_PYTHON_CLIENT_PREALLOCATE="false"
        )
        result, error = report._run_worker("error", c, env, 300, script=__file__)
        return dict(c, setting=setting, xla_flags=SETTINGS[setting], error=error) | (
            result or {}
        )

    jobs = [(s, k) for s in SETTINGS for k in STRATEGIES]
    workers = max(1, min(len(jobs), (os.cpu_count() or 2) // 2))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(one, jobs))
    import jax

    print(
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}; "
        f"d={args.width}, n={args.n_steps}, float32 vs float64 backprop"
    )
    print(f"{'setting':16s} {'strategy':14s} {'error':>8s}  leaves")
    for r in rows:
        leaves = " ".join(f"{e:.1e}" for e in r.get("leaf_errors", []))
        err = r.get("grad_rel_error")
        err = f"{err:8.1e}" if err is not None else f"failed: {r['error']}"
        print(f"{r['setting']:16s} {r['strategy']:14s} {err}  {leaves}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                dict(
                    device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows
                ),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
