"""The seed's stability column, measured: the continuous adjoint re-integrates y backwards
in time, which on a dissipative system amplifies every error by the contraction it
undoes, so its gradient error grows with the horizon T; the symplectic adjoint
recomputes each step forwards from a stored state and stays at rounding level.

The system: a damped field f(y) = MLP(y) − Γ·y with two decay rates Γ = diag(0.5, 3)
(MLP(2 → 32 → 2, tanh)), a batch of 16 states, float64, Tsit5 with PID(1e-8, 1e-8);
loss ½·mean(y(T)²). Backwards in time the fast mode grows e^{2.5 t} faster than the slow
one, so an error the backward solve makes in it is amplified relative to the solution. Errors are
relative (‖g − g_ref‖ / ‖g_ref‖ over all leaves) against
`diffrax.RecursiveCheckpointAdjoint()`, the exact gradient of the same discretised solve.

1. `horizon`: error against T for `continuous` (backward solve at the forward solve's
   tolerances) and `symplectic`.
2. `tolerance`: at the longest T, `continuous`'s error against its backward solve's
   tolerance, and the time of each gradient beside `symplectic`'s (median of
   interleaved runs).

    python benchmarks/stability.py [--quick] [--out DIR]

writes DIR/stability.json, DIR/stability.md and DIR/stability.png.
"""

import argparse
import json
import os
import platform
import time

import jax

jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from reporting.script import device_name  # noqa: E402

import neuralode  # noqa: E402
import neuralode.measure  # noqa: E402

DAMPING = (0.5, 3.0)  # the decay rates of the two components
PID = diffrax.PIDController(rtol=1e-8, atol=1e-8)


class DampedField(eqx.Module):
    mlp: neuralode.MLPField

    def __call__(self, t, y, args=None):
        return self.mlp(t, y) - jnp.asarray(DAMPING, y.dtype) * y


def _gradient(adjoint, static, horizon):
    def loss(params, y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(eqx.combine(params, static)),
            diffrax.Tsit5(),
            0.0,
            horizon,
            None,
            y0,
            stepsize_controller=PID,
            adjoint=adjoint,
            max_steps=4096,
        )
        return 0.5 * jnp.mean(sol.ys**2)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _median_ms(fns: dict, args, repeats: int) -> dict:
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: float(np.median(t)) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer horizons")
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args(argv)
    horizons = (1.0, 4.0) if args.quick else (1.0, 2.0, 4.0, 8.0, 16.0)
    tolerances = (1e-6, 1e-10) if args.quick else (1e-4, 1e-6, 1e-8, 1e-10, 1e-12)
    field = DampedField(neuralode.MLPField(2, 32, 1, key=jax.random.PRNGKey(0)))
    params, static = eqx.partition(field, eqx.is_array)
    y0 = jax.random.normal(jax.random.PRNGKey(1), (16, 2))
    strategies = {
        "continuous": neuralode.get_adjoint("continuous"),
        "symplectic": neuralode.SymplecticAdjoint(),
    }

    horizon_rows = []
    for horizon in horizons:
        reference = _gradient(diffrax.RecursiveCheckpointAdjoint(), static, horizon)
        exact = reference(params, y0)
        for name, adjoint in strategies.items():
            grad = _gradient(adjoint, static, horizon)(params, y0)
            error = neuralode.measure.relative_error(grad, exact)
            horizon_rows.append(dict(strategy=name, horizon=horizon, error=error))
            print(f"T={horizon:5.1f} {name:11s} error {error:.1e}", flush=True)

    horizon = horizons[-1]
    exact = _gradient(diffrax.RecursiveCheckpointAdjoint(), static, horizon)(params, y0)
    fns = {
        f"continuous (tol {tol:g})": _gradient(
            neuralode.get_adjoint("continuous", rtol=tol, atol=tol), static, horizon
        )
        for tol in tolerances
    }
    fns["symplectic"] = _gradient(neuralode.SymplecticAdjoint(), static, horizon)
    times = _median_ms(fns, (params, y0), 3 if args.quick else 7)
    tolerance_rows = []
    for name, fn in fns.items():
        error = neuralode.measure.relative_error(fn(params, y0), exact)
        tolerance_rows.append(dict(strategy=name, error=error, ms=times[name]))
        print(f"T={horizon:5.1f} {name:24s} error {error:.1e} {times[name]:8.1f} ms")

    result = dict(
        device=device_name(),
        jax=jax.__version__,
        diffrax=diffrax.__version__,
        python=platform.python_version(),
        damping=DAMPING,
        horizon=horizon_rows,
        tolerance=dict(horizon=horizon, rows=tolerance_rows),
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "stability.json"), "w") as f:
        json.dump(result, f, indent=1)
    render(result, args.out)
    return result


def render(result: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    horizons = sorted({r["horizon"] for r in result["horizon"]})
    error = {(r["strategy"], r["horizon"]): r["error"] for r in result["horizon"]}
    lines = [
        f"# Gradient error against the horizon ({result['device']})",
        "",
        "`python benchmarks/stability.py`, jax "
        f"{result['jax']}: a damped field f(y) = MLP(y) − diag{tuple(result['damping'])}·y, "
        "float64, Tsit5 with PID(1e-8, 1e-8); relative error against the exact "
        "gradient of the same discretised solve (`RecursiveCheckpointAdjoint()`).",
        "",
        "| T | " + " | ".join(f"{h:g}" for h in horizons) + " |",
        "|---|" + "---|" * len(horizons),
    ]
    for name in ("continuous", "symplectic"):
        cells = " | ".join(f"{error[name, h]:.1e}" for h in horizons)
        lines.append(f"| `{name}` | {cells} |")
    tol = result["tolerance"]
    lines += [
        "",
        f"At T = {tol['horizon']:g}, `continuous` with tighter backward tolerances:",
        "",
        "| strategy | error | time (ms) |",
        "|---|---|---|",
    ]
    for r in tol["rows"]:
        lines.append(f"| {r['strategy']} | {r['error']:.1e} | {r['ms']:.1f} |")
    with open(os.path.join(out, "stability.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, marker in (("continuous", "s"), ("symplectic", "o")):
        left.plot(
            horizons, [error[name, h] for h in horizons], marker=marker, label=name
        )
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("horizon T")
    left.set_ylabel("relative gradient error")
    left.legend()
    continuous = [r for r in tol["rows"] if r["strategy"] != "symplectic"]
    right.plot(
        [r["ms"] for r in continuous],
        [r["error"] for r in continuous],
        marker="s",
        label="continuous, backward tolerance as labelled",
    )
    for r in continuous:
        label = r["strategy"].removeprefix("continuous (tol ").removesuffix(")")
        right.annotate(label, (r["ms"], r["error"]), fontsize=7, rotation=30)
    for r in tol["rows"]:
        if r["strategy"] == "symplectic":
            right.scatter(
                r["ms"], r["error"], marker="o", color="C1", label="symplectic"
            )
    right.legend(fontsize=7)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("time of one gradient (ms)")
    right.set_title(f"T = {tol['horizon']:g}", fontsize=9)
    fig.suptitle(f"Damped field, {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "stability.png"), dpi=110)


if __name__ == "__main__":
    main()
