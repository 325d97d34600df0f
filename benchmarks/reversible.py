"""How exactly `neuralode.Reversible` undoes its steps: the error of the reconstructed
start against the number of steps n and the coupling λ, and the gradient error that
follows from it.

Two linear fields y' = A y on [0, 10], y_0 = (1, 0.5), float64: a damped spiral
A = [[-0.5, 1], [-1, -0.5]] and a harmonic oscillator A = [[0, 1], [-1, 0]].

1. `reconstruction`: `Reversible(Tsit5(), coupling=λ)` takes n constant steps forwards,
   then `Reversible.backward_step` undoes them one by one; reported is
   max|y_0' − y_0| / max|y_0| for the reconstructed y_0'. Undoing a step multiplies the
   parasitic mode by e^{hμ}/λ, so rounding errors grow by up to λ^{−n} (and, on the
   damped field, by the e^{T/2} that undoing its contraction costs any method).
2. `gradient`: at the default λ, the relative error of `ReversibleAdjoint`'s gradient
   (w.r.t. y_0 and A; loss Σ y(10)²) against `RecursiveCheckpointAdjoint()` on the
   same `Reversible` solver.

    python benchmarks/reversible.py [--quick] [--out DIR]

writes DIR/reversible.json and DIR/reversible.md.
"""

import argparse
import json
import os
import platform

import jax

jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import jax.lax as lax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from reporting.script import device_name  # noqa: E402

import neuralode  # noqa: E402
import neuralode.measure  # noqa: E402

FIELDS = {
    "damped": [[-0.5, 1.0], [-1.0, -0.5]],
    "oscillating": [[0.0, 1.0], [-1.0, 0.0]],
}
Y0 = (1.0, 0.5)
HORIZON = 10.0
TERM = diffrax.ODETerm(lambda t, y, matrix: matrix @ y)


def _roundtrip(coupling: float):
    """`(matrix, n) -> relative error of y_0 after n steps forwards and back`, jitted
    once for every n (the steps run in `fori_loop`s)."""
    solver = neuralode.Reversible(diffrax.Tsit5(), coupling=coupling)

    @jax.jit
    def error(matrix, n):
        y0 = jnp.asarray(Y0)
        h = HORIZON / n

        def forward(i, state):
            y, z = state
            y1, _, _, z1, _ = solver.step(TERM, i * h, (i + 1) * h, y, matrix, z, False)
            return y1, z1

        def back(i, state):
            k = n - 1 - i
            return solver.backward_step(TERM, k * h, (k + 1) * h, *state, matrix)

        y_end = lax.fori_loop(0, n, forward, (y0, y0))
        y_start, _ = lax.fori_loop(0, n, back, y_end)
        return jnp.max(jnp.abs(y_start - y0)) / jnp.max(jnp.abs(y0))

    return error


def _gradient_error(matrix, n: int) -> float:
    solver = neuralode.Reversible(diffrax.Tsit5())

    def grad(adjoint):
        def loss(y0, matrix):
            sol = diffrax.diffeqsolve(
                TERM,
                solver,
                0.0,
                HORIZON,
                HORIZON / n,
                y0,
                args=matrix,
                adjoint=adjoint,
                max_steps=n,
            )
            return jnp.sum(sol.ys**2)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(Y0), matrix)

    return neuralode.measure.relative_error(
        grad(neuralode.ReversibleAdjoint()), grad(diffrax.RecursiveCheckpointAdjoint())
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer n and λ")
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args(argv)
    ns = (100, 1000) if args.quick else (100, 300, 1000, 3000, 10000)
    couplings = (0.9, 0.999) if args.quick else (0.5, 0.9, 0.99, 0.999, 1.0)

    reconstruction, gradient = [], []
    for coupling in couplings:
        error = _roundtrip(coupling)
        for field, matrix in FIELDS.items():
            for n in ns:
                e = float(error(jnp.asarray(matrix), n))
                reconstruction.append(
                    dict(field=field, coupling=coupling, n=n, error=e)
                )
                print(f"λ={coupling:<6g} {field:12s} n={n:6d} y0 error {e:.1e}")
    for field, matrix in FIELDS.items():
        for n in ns:
            e = _gradient_error(jnp.asarray(matrix), n)
            gradient.append(dict(field=field, n=n, error=e))
            print(f"default λ {field:12s} n={n:6d} gradient error {e:.1e}", flush=True)

    result = dict(
        command="python benchmarks/reversible.py" + (" --quick" if args.quick else ""),
        device=device_name(),
        jax=jax.__version__,
        diffrax=diffrax.__version__,
        python=platform.python_version(),
        default_coupling=neuralode.Reversible(diffrax.Tsit5()).coupling,
        reconstruction=reconstruction,
        gradient=gradient,
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "reversible.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "reversible.md"), "w") as f:
        f.write(render(result))
    return result


def render(result: dict) -> str:
    """The results as Markdown: for each field, the reconstruction error by n and λ,
    then the gradient error at the default λ."""
    rows = result["reconstruction"]
    ns = sorted({r["n"] for r in rows})
    couplings = sorted({r["coupling"] for r in rows})
    error = {(r["field"], r["coupling"], r["n"]): r["error"] for r in rows}
    grad = {(r["field"], r["n"]): r["error"] for r in result["gradient"]}
    lines = [
        f"# Undoing reversible steps ({result['device']})",
        "",
        f"`{result['command']}`, jax {result['jax']}: `Reversible(Tsit5(), "
        "coupling=λ)` on y' = A y over [0, 10], float64, n constant steps forwards "
        "then undone; relative error of the reconstructed y_0. Last row: relative "
        "error of `ReversibleAdjoint`'s gradient against `RecursiveCheckpointAdjoint()` "
        f"on the same solver, at the default λ = {result['default_coupling']:g}.",
    ]
    for field in FIELDS:
        if not any(r["field"] == field for r in rows):
            continue
        lines += [
            "",
            f"{field}:",
            "",
            "| λ \\ n | " + " | ".join(str(n) for n in ns) + " |",
            "|---|" + "---|" * len(ns),
        ]
        for c in couplings:
            cells = " | ".join(_cell(error.get((field, c, n))) for n in ns)
            lines.append(f"| {c:g} | {cells} |")
        cells = " | ".join(_cell(grad.get((field, n))) for n in ns)
        lines.append(f"| gradient | {cells} |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return "–"
    return f"{value:.1e}" if np.isfinite(value) else "overflow"


if __name__ == "__main__":
    main()
