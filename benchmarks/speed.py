"""One gradient, `symplectic` against `diffrax.RecursiveCheckpointAdjoint(checkpoints=n)`.

The setting: Tsit5, 128 constant steps over t ∈ [0, 1], f = MLP(32 → 64 → 64 → 32, tanh)
applied to a batch of 256 states, float32, loss ½·mean(y(1)²), gradient with respect to
the MLP's parameters and y0. Both gradients are compiled first, then timed in interleaved
runs (A, B, A, B, …) so that drifts of the machine hit both alike; the medians and their
ratio are printed.

    python benchmarks/speed.py [--repeats 31] [--json FILE]
"""

import argparse
import json
import os
import platform
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import neuralode

STATE, WIDTH, DEPTH, BATCH, STEPS = 32, 64, 2, 256, 128


def gradient(adjoint):
    def loss(params, static, y0):
        field = eqx.combine(params, static)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            diffrax.Tsit5(),
            0.0,
            1.0,
            1.0 / STEPS,
            y0,
            saveat=diffrax.SaveAt(t1=True),
            adjoint=adjoint,
            max_steps=STEPS,
        )
        return 0.5 * jnp.mean(sol.ys[-1] ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 2)), static_argnums=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    field = neuralode.MLPField(STATE, WIDTH, DEPTH, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(field, eqx.is_array)
    y0 = jax.random.normal(jax.random.PRNGKey(1), (BATCH, STATE), jnp.float32)
    fns = {
        "symplectic": gradient(neuralode.get_adjoint("symplectic")),
        "diffrax_rca_n": gradient(
            diffrax.RecursiveCheckpointAdjoint(checkpoints=STEPS)
        ),
    }
    grads = {k: jax.block_until_ready(f(params, static, y0)) for k, f in fns.items()}
    for f in fns.values():  # a second warm-up: first runs touch fresh memory
        jax.block_until_ready(f(params, static, y0))
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for name, f in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(f(params, static, y0))
            times[name].append((time.perf_counter() - start) * 1e3)
    med = {k: float(np.median(v)) for k, v in times.items()}
    result = dict(
        device=str(jax.devices()[0].device_kind),
        cpu_count=os.cpu_count(),
        jax=jax.__version__,
        diffrax=diffrax.__version__,
        python=platform.python_version(),
        repeats=args.repeats,
        symplectic_ms=med["symplectic"],
        rca_n_ms=med["diffrax_rca_n"],
        ratio=med["symplectic"] / med["diffrax_rca_n"],
        grad_rel_difference=neuralode.relative_error(
            grads["symplectic"], grads["diffrax_rca_n"]
        ),
    )
    print(
        f"device {result['device']} ({os.cpu_count()} cores), jax {jax.__version__}, "
        f"diffrax {diffrax.__version__}; Tsit5, n={STEPS}, MLP({STATE}->{WIDTH}->{WIDTH}"
        f"->{STATE}, tanh), batch {BATCH}, float32, median of {args.repeats} "
        "interleaved runs"
    )
    print(f"{'symplectic':42s} {med['symplectic']:9.2f} ms")
    print(
        f"{'RecursiveCheckpointAdjoint(checkpoints=n)':42s} {med['diffrax_rca_n']:9.2f} ms"
    )
    print(f"{'ratio symplectic / RCA(n)':42s} {result['ratio']:9.3f}")
    print(
        f"{'relative difference of the gradients':42s} {result['grad_rel_difference']:9.1e}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
