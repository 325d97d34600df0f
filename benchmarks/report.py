"""Memory, time and gradient error of every gradient strategy, swept over the number of
steps n, the depth m and width d of f_θ, the stages s of the solver, the batch and the
state size, and the time–memory plane of every exact gradient: the measured version of
the cost table of `neuralode`'s strategies.

    python benchmarks/report.py [--quick] [--out DIR] [--budget-s S]
    python benchmarks/report.py --render DIR    # results.md and plots from DIR/results.json

writes `DIR/results.json`, `DIR/results.md` and PNG plots (default DIR:
`benchmarks/results/<device-kind>/`). Every figure in `results.md` is read from
`results.json`. The problem and the plan: `reporting/problems.py`; the phases of a run
(none of which shares the device with another): `reporting/run.py`.

What each row measures:

- `xla_temp_bytes`: XLA's static temporary-buffer figure of the compiled gradient.
- `peak_bytes`: on a GPU, the device peak of the gradient minus the bytes in use with
    its inputs placed, in a fresh process with a preallocated pool and
    `XLA_FLAGS=--xla_gpu_autotune_level=0` (`reporting/workers.py`). `null` on CPU.
- `time_ms`, `time_q25_ms`, `time_q75_ms`: median and quartiles over `repeats` rounds in
    which the gradients of one problem and its forward solve run interleaved, in this
    process, alone on the device; `time_ratio` (and quartiles): the gradient's time over
    the forward solve's of the same round; `forward_ms`: the forward solve's median.
- `grad_rel_error`: against the float64 gradient of the same discretisation (full
    backpropagation in float64).
- `grad_rel_error_continuous`: against a converged float64 solve (Dopri8, rtol = atol =
  1e-12).
- `nfe_forward` / `nfe_backward`: evaluations of f counted at run time in a separate,
    untimed compile: the primal solve, and the gradient minus the primal solve.

Float32 matrix products run at `jax_default_matmul_precision="highest"`: JAX's default on
NVIDIA GPUs is TF32, whose rounding would hide the strategies' own errors (torch's default
for float32 matmuls is full float32 too). The `precision` sweep measures JAX's default
beside it; each row records its `precision`, and its `tol` (None: constant steps).
"""

import argparse
import json
import os
import sys
import time

from reporting import analysis, render, run

QUICK_HELP = "small sizes: about 6-7 minutes on 2 CPU cores (budget 480 s)"


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    parser.add_argument(
        "--out", help="output folder (default benchmarks/results/<device-kind>/)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        help="wall-time budget: the plan is cut to fit it by its estimate, and what "
        "does not fit or does not finish is listed as not measured",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="configurations compiled side by side (default: half the CPU cores, 2-8)",
    )
    parser.add_argument(
        "--render",
        metavar="DIR",
        help="only rewrite DIR/results.md, the plots and the checks in DIR/results.json "
        "from the rows of DIR/results.json",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="only print the plan and its estimated time",
    )
    parser.add_argument(
        "--summary",
        metavar="DIR",
        help="print the README's summary of DIR/results.json",
    )
    parser.add_argument("--peak-worker", help=argparse.SUPPRESS)
    parser.add_argument("--torch-worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def rerender(out_dir: str) -> str:
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    results["checks"] = analysis.checks(results["rows"])  # derived from the rows alone
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    render.plot(results, out_dir)
    return render.write_markdown(results, out_dir)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.peak_worker:
        from reporting import workers

        print("RESULT " + json.dumps(workers.peak_worker(json.loads(args.peak_worker))))
        return
    if args.torch_worker:
        from reporting import torch_side

        p = json.loads(args.torch_worker)
        deadline = time.perf_counter() + p["budget_s"]
        print(
            "RESULT "
            + json.dumps(torch_side.worker(p["configs"], p["repeats"], deadline))
        )
        return
    if args.summary:
        from reporting import summary

        with open(os.path.join(args.summary, "results.json")) as f:
            print(summary.summaries(json.load(f), os.path.relpath(args.summary)))
        return
    if args.render:
        print(rerender(args.render).split("## Memory growth")[0])
        return
    mode = "quick" if args.quick else "full"
    budget_s = args.budget_s or run.SIZES[mode]["budget_s"]
    threads = args.threads or max(2, min(8, (os.cpu_count() or 2) // 2))
    if args.plan:
        backend = run.workers.probe_backend()
        _, _, _, skipped = run.make_plan(mode, budget_s, backend, threads)
        print("\n".join(f"  cut: {s}" for s in skipped))
        return
    command = " ".join(["python", "benchmarks/report.py"] + list(argv))
    text = run.run(mode, budget_s, args.out, threads, command)
    print(text.split("## Memory growth")[0])  # what a person reads first


if __name__ == "__main__":
    main()
