"""Exact gradients on the time–memory plane: `SymplecticAdjoint` over a ladder of
checkpoints beside Diffrax's `RecursiveCheckpointAdjoint` over the same ladder,
`BackpropAdjoint` and `DirectAdjoint`, and what a generous `max_steps` costs.

Three measurements, all in one process (XLA's static temp bytes of the jitted gradient;
median and interquartile range of interleaved timed runs):

1. `adaptive`: f = MLP(32 → 128 → 128 → 32, tanh) on a batch of 256 states, float32,
   Tsit5 with PID(1e-5, 1e-5) on [0, 1] (a solve of a few steps), at `max_steps` of
   256, 4096 and 16384: symplectic's default and `checkpoints=4`, Diffrax's
   `RecursiveCheckpointAdjoint()`, and backprop at `max_steps=128`.
2. `plane`: the same field, Tsit5 with n constant steps (`--steps`, 1024 by default),
   every exact strategy and peer, the Pareto frontier of (memory, time) marked
   (`reversible` solves with `neuralode.Reversible(Tsit5())`, another discretisation
   of the same ODE).
3. `wide`: memory only, a field of width 512, at each rung of the ladder.

    python benchmarks/checkpoints.py [--quick] [--out DIR]

writes DIR/checkpoints.json, DIR/checkpoints.md and DIR/checkpoints.png.
"""

import argparse
import json
import os
import platform

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from reporting import plane as plane_, script, timing

import neuralode
import neuralode.measure

STATE, DEPTH = 32, 2


def problem(width, batch):
    field = neuralode.MLPField(STATE, width, DEPTH, key=jax.random.PRNGKey(0))
    y0 = jax.random.normal(jax.random.PRNGKey(1), (batch, STATE), jnp.float32)
    return eqx.partition(field, eqx.is_array), y0


def gradient(adjoint, static, *, steps=None, max_steps, controller=None):
    """The jitted gradient of ½·mean(y(1)²) with respect to the field and y0."""
    if controller is None:
        controller, dt0 = diffrax.ConstantStepSize(), 1.0 / steps
    else:
        dt0 = None

    solver = diffrax.Tsit5()
    if isinstance(adjoint, neuralode.ReversibleAdjoint):
        solver = adjoint.wrap(solver)  # the only scheme it differentiates

    def loss(params, y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(eqx.combine(params, static)),
            solver,
            0.0,
            1.0,
            dt0,
            y0,
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=max_steps,
        )
        return 0.5 * jnp.mean(sol.ys**2)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def temp_bytes(fn, *args) -> int:
    return neuralode.measure.compiled_temp_bytes(fn.lower(*args).compile())


def adaptive(repeats: int, quick: bool) -> list[dict]:
    (params, static), y0 = problem(128, 64 if quick else 256)
    pid = diffrax.PIDController(rtol=1e-5, atol=1e-5)
    candidates = {}
    for max_steps in (256, 4096, 16384):
        for name, adjoint in [
            ("symplectic", neuralode.SymplecticAdjoint()),
            ("symplectic (checkpoints=4)", neuralode.SymplecticAdjoint(checkpoints=4)),
            ("RecursiveCheckpointAdjoint()", diffrax.RecursiveCheckpointAdjoint()),
        ]:
            candidates[name, max_steps] = gradient(
                adjoint, static, max_steps=max_steps, controller=pid
            )
    candidates["backprop", 128] = gradient(
        neuralode.BackpropAdjoint(), static, max_steps=128, controller=pid
    )
    candidates["RecursiveCheckpointAdjoint()", 128] = gradient(
        diffrax.RecursiveCheckpointAdjoint(), static, max_steps=128, controller=pid
    )
    times = timing.median_iqr(candidates, (params, y0), repeats)
    return [
        dict(
            strategy=name,
            max_steps=max_steps,
            temp_bytes=temp_bytes(fn, params, y0),
            **times[name, max_steps],
        )
        for (name, max_steps), fn in candidates.items()
    ]


def _ladder(steps: int) -> list[int]:
    return [c for c in (2, 4, 8, 16, 32, 64, 128) if c < steps]


def plane(steps: int, repeats: int, quick: bool) -> list[dict]:
    (params, static), y0 = problem(128, 16 if quick else 32)
    candidates = {
        "backprop": neuralode.BackpropAdjoint(),
        "symplectic (every step)": neuralode.SymplecticAdjoint(checkpoints="all"),
        "RecursiveCheckpointAdjoint(checkpoints=n)": diffrax.RecursiveCheckpointAdjoint(
            checkpoints=steps
        ),
        "RecursiveCheckpointAdjoint()": diffrax.RecursiveCheckpointAdjoint(),
        "DirectAdjoint()": diffrax.DirectAdjoint(),
        "reversible (on Reversible(Tsit5()))": neuralode.ReversibleAdjoint(),
    }
    for c in _ladder(steps):
        candidates[f"symplectic (checkpoints={c})"] = neuralode.SymplecticAdjoint(
            checkpoints=c
        )
        candidates[f"RecursiveCheckpointAdjoint(checkpoints={c})"] = (
            diffrax.RecursiveCheckpointAdjoint(checkpoints=c)
        )
    fns = {
        name: gradient(adjoint, static, steps=steps, max_steps=steps)
        for name, adjoint in candidates.items()
    }
    times = timing.median_iqr(fns, (params, y0), repeats)
    rows = [
        dict(strategy=name, temp_bytes=temp_bytes(fn, params, y0), **times[name])
        for name, fn in fns.items()
    ]
    flags = plane_.pareto([(r["temp_bytes"], r["ms"]) for r in rows])
    for row, flag in zip(rows, flags, strict=True):
        row["pareto"] = flag
    return rows


def wide(steps: int) -> list[dict]:
    (params, static), y0 = problem(512, 32)
    rows = []
    for c in _ladder(steps):
        for name, adjoint in [
            ("symplectic", neuralode.SymplecticAdjoint(checkpoints=c)),
            ("RecursiveCheckpointAdjoint", diffrax.RecursiveCheckpointAdjoint(c)),
        ]:
            fn = gradient(adjoint, static, steps=steps, max_steps=steps)
            rows.append(
                dict(
                    strategy=name, checkpoints=c, temp_bytes=temp_bytes(fn, params, y0)
                )
            )
    return rows


def checks(result: dict) -> list[str]:
    """The targets, each with the figures behind it."""
    adaptive = {(r["strategy"], r["max_steps"]): r for r in result["adaptive"]}
    lines = []
    for name in ("symplectic", "symplectic (checkpoints=4)"):
        ratio = adaptive[name, 16384]["ms"] / adaptive[name, 256]["ms"]
        lines.append(
            f"{name}: time at max_steps=16384 / at 256 = {ratio:.2f} (target ≤ 1.5)"
        )
    rca = "RecursiveCheckpointAdjoint()"
    for max_steps in (256, 4096, 16384):
        ours, theirs = adaptive["symplectic", max_steps], adaptive[rca, max_steps]
        lines.append(
            f"symplectic / {rca} at max_steps={max_steps}: time "
            f"{ours['ms'] / theirs['ms']:.2f}, memory "
            f"{ours['temp_bytes'] / theirs['temp_bytes']:.2f} (targets ≤ 1.2)"
        )
    ratio = adaptive["backprop", 128]["ms"] / adaptive[rca, 128]["ms"]
    lines.append(f"backprop / {rca} at max_steps=128: time {ratio:.1f} (target ≤ 8)")
    plane = {r["strategy"]: r for r in result["plane"]}
    for c in _ladder(result["steps"]):
        ours = plane[f"symplectic (checkpoints={c})"]
        theirs = plane[f"RecursiveCheckpointAdjoint(checkpoints={c})"]
        lines.append(
            f"checkpoints={c}: symplectic / RCA time {ours['ms'] / theirs['ms']:.2f}, "
            f"memory {ours['temp_bytes'] / theirs['temp_bytes']:.2f} (targets ≤ 1)"
        )
    for c in _ladder(result["steps"]):
        at = {
            r["strategy"]: r["temp_bytes"]
            for r in result["wide"]
            if r["checkpoints"] == c
        }
        lines.append(
            f"width 512, checkpoints={c}: symplectic / RCA memory "
            f"{at['symplectic'] / at['RecursiveCheckpointAdjoint']:.2f} (target < 1)"
        )
    return lines


def render(result: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 2**20
    lines = [
        f"# Exact gradients: time and memory ({result['device']})",
        "",
        f"`python benchmarks/checkpoints.py`, jax {result['jax']}, diffrax "
        f"{result['diffrax']}; medians of {result['repeats']} interleaved runs "
        "(interquartile range in brackets); memory is XLA's static temp bytes of the "
        "jitted gradient.",
        "",
        f"## Constant steps (n = {result['steps']}, batch {result['plane_batch']})",
        "",
        "| strategy | memory (MiB) | time (ms) | Pareto |",
        "|---|---|---|---|",
    ]
    for r in sorted(result["plane"], key=lambda r: r["temp_bytes"]):
        lines.append(
            f"| {r['strategy']} | {r['temp_bytes'] / mib:.2f} | {r['ms']:.1f} "
            f"({r['iqr_ms']:.1f}) | {'yes' if r['pareto'] else ''} |"
        )
    lines += [
        "",
        f"## Adaptive solve with a generous max_steps (batch {result['adaptive_batch']})",
        "",
        "| strategy | max_steps | memory (MiB) | time (ms) |",
        "|---|---|---|---|",
    ]
    for r in result["adaptive"]:
        lines.append(
            f"| {r['strategy']} | {r['max_steps']} | {r['temp_bytes'] / mib:.2f} | "
            f"{r['ms']:.1f} ({r['iqr_ms']:.1f}) |"
        )
    lines += [
        "",
        "## Width 512 (memory only)",
        "",
        "| checkpoints | symplectic (MiB) | RCA (MiB) |",
        "|---|---|---|",
    ]
    for c in _ladder(result["steps"]):
        at = {
            r["strategy"]: r["temp_bytes"]
            for r in result["wide"]
            if r["checkpoints"] == c
        }
        lines.append(
            f"| {c} | {at['symplectic'] / mib:.2f} | "
            f"{at['RecursiveCheckpointAdjoint'] / mib:.2f} |"
        )
    lines += ["", "## Checks", ""] + [f"- {line}" for line in result["checks"]]
    with open(os.path.join(out, "checkpoints.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(7, 5))
    points = [
        dict(label=r["strategy"], bytes=r["temp_bytes"], ms=r["ms"], pareto=r["pareto"])
        for r in result["plane"]
    ]
    plane_.plot_plane(
        ax, points, f"n = {result['steps']} Tsit5 steps, {result['device']}"
    )
    ax.set_xlabel("XLA temp memory of the gradient (MiB)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "checkpoints.png"), dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, a smoke test"
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args(argv)
    steps = args.steps or (64 if args.quick else 1024)
    repeats = args.repeats or (3 if args.quick else 7)
    os.makedirs(args.out, exist_ok=True)
    result = dict(
        device=script.device_name(),
        jax=jax.__version__,
        diffrax=diffrax.__version__,
        python=platform.python_version(),
        steps=steps,
        repeats=repeats,
        plane_batch=16 if args.quick else 32,
        adaptive_batch=64 if args.quick else 256,
        adaptive=adaptive(repeats, args.quick),
        plane=plane(steps, repeats, args.quick),
        wide=wide(steps),
    )
    result["checks"] = checks(result)
    with open(os.path.join(args.out, "checkpoints.json"), "w") as f:
        json.dump(result, f, indent=1)
    render(result, args.out)
    print("\n".join(result["checks"]))
    return result


if __name__ == "__main__":
    main()
