"""Run the spiral example with every gradient strategy and print a Markdown table of
their memory (XLA's static temporary bytes of the training step) and time, from the
example's own metrics.

    python examples/compare_adjoints.py --niters 200 --out runs/compare

Options after `--` go to every spiral run, e.g. `-- --solver dopri5 --steps 20`.
"""

import argparse
import os
import platform

import jax
import numpy as np

import neuralode

import _common
import spiral


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--niters",
        type=_common.positive_int,
        default=200,
        help="iterations per strategy (default: 200)",
    )
    parser.add_argument(
        "--out",
        default="runs/compare",
        help="directory for the runs (default: runs/compare)",
    )
    parser.add_argument(
        "--adjoints",
        nargs="+",
        choices=neuralode.ADJOINT_NAMES,
        default=list(neuralode.ADJOINT_NAMES),
        help="strategies to compare (default: all)",
    )
    parser.add_argument(
        "spiral_args", nargs="*", help="options passed to examples/spiral.py (after --)"
    )
    args = parser.parse_args(argv)
    owned = ("--adjoint", "--niters", "--out", "--resume", "--overwrite")
    # argparse also takes unambiguous prefixes (--nit for --niters).
    clash = [
        a
        for a in args.spiral_args
        if a.startswith("--") and any(o.startswith(a.split("=")[0]) for o in owned)
    ]
    if clash:
        parser.error(
            f"{', '.join(clash)}: set by this script for each run (use its own "
            "--niters, --out and --adjoints); pass other spiral.py options after --"
        )

    rows = []
    for adjoint in args.adjoints:
        metrics = spiral.main(
            [
                *args.spiral_args,
                "--adjoint",
                adjoint,
                "--niters",
                str(args.niters),
                "--out",
                os.path.join(args.out, adjoint),
                "--no-progress",
                "--overwrite",  # each comparison is a fresh run
            ]
        )
        # The first iteration is excluded: it includes one-off dispatch costs.
        per_iter = np.median(metrics["time_s"][1:] or metrics["time_s"])
        rows.append(
            f"| `{adjoint}` | {metrics['memory_bytes'] / 1024:,.1f} | "
            f"{per_iter * 1e3:.2f} | {metrics['compile_s']:.1f} | "
            f"{metrics['nfe'][-1]} | {metrics['loss'][-1]:.4g} |"
        )
    config = metrics["config"]
    table = "\n".join(
        [
            f"Spiral, {args.niters} iterations, solver {config['solver']}, "
            + (
                f"{config['steps']} constant steps"
                if config["steps"]
                else f"rtol {config['rtol']}, atol {config['atol']}"
            )
            + f" per window, batch {config['batch_size']}, width {config['width']}; "
            f"{device_label()}.",
            "",
            "| strategy | XLA temp memory of the step (KiB) | time per iteration (ms, "
            "median) | compile (s) | forward nfe / iter | final loss |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(table)
    return table


def device_label() -> str:
    """The device the runs computed on: "N-core CPU (machine)" or the accelerator's
    kind, e.g. "NVIDIA H200 (gpu)"."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"{len(os.sched_getaffinity(0))}-core CPU ({platform.machine()})"
    return f"{device.device_kind} ({device.platform})"


if __name__ == "__main__":
    main()
