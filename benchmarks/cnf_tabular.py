"""A paper-sized continuous normalising flow: memory and time per iteration of each
gradient strategy on FFJORD's MINIBOONE model, the setting of Matsubara et al.'s
continuous normalising flow experiments (NeurIPS 2021, Section 5).

FFJORD's MINIBOONE model (Grathwohl et al. 2019, `train_tabular.py --data miniboone
--nhidden 2 --hdim_factor 20 --num_blocks 1 --nonlinearity softplus --batch_size
1000`): a flow on 43 dimensions whose vector field is an MLP 43 → 860 → 860 → 43 of
concat-squash layers (each layer's output gated and shifted by the time) with softplus,
one CNF block, Dopri5 with rtol 1e-6 and atol 1e-8, batch 1000, Hutchinson's trace
estimator with Gaussian noise; the end time is fixed at 1 (FFJORD learns it). The data
are synthetic points of that shape (a mixture of Gaussians in 43 dimensions): the cost of
an iteration depends on the values only through the number of steps the solver takes,
which is reported.

Each strategy differentiates the same negative log-likelihood; one iteration is the
jitted gradient (the optimiser's update is the same for all and small). Memory is XLA's
static figure for that gradient (arguments, outputs and temporaries); time is the median
and interquartile range of interleaved runs.

    python benchmarks/cnf_tabular.py --quick --out benchmarks/results/cpu
    python benchmarks/cnf_tabular.py --out benchmarks/results/<device>     # on a GPU

`--render DIR` rewrites DIR/cnf_tabular.md from DIR/cnf_tabular.json.
"""

import os
import sys
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import neuralode
import neuralode.measure

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reporting import script, timing  # noqa: E402

DIM = 43
SIZES = {
    # The paper's sizes; a GPU measures all of them.
    "full": dict(batch=1000, hidden=20 * DIM, repeats=11),
    # A CPU measures a few iterations at the paper's width and a tenth of its batch.
    "quick": dict(batch=100, hidden=20 * DIM, repeats=3),
}
RTOL, ATOL = 1e-6, 1e-8  # FFJORD's train_tabular.py defaults

PAPER_NOTE = (
    "Matsubara, Miyatake & Yaguchi (NeurIPS 2021) report memory and time per iteration "
    "for this model in their continuous normalising flow table (Section 5), measured "
    "with PyTorch on their GPU; their figures are not reproduced here, as no copy of the "
    "table could be checked. Compare the ratios between strategies, not the absolute "
    "figures: theirs come from another framework and device."
)


class ConcatSquashLinear(eqx.Module):
    """FFJORD's concat-squash layer: (W x + b) · σ(a t + c) + e t."""

    linear: eqx.nn.Linear
    gate: eqx.nn.Linear
    shift: eqx.nn.Linear

    def __init__(self, in_size, out_size, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.linear = eqx.nn.Linear(in_size, out_size, key=k1)
        self.gate = eqx.nn.Linear(1, out_size, key=k2)
        self.shift = eqx.nn.Linear(1, out_size, use_bias=False, key=k3)

    def __call__(self, t, x):
        t = jnp.reshape(t, (1,)).astype(x.dtype)
        return self.linear(x) * jax.nn.sigmoid(self.gate(t)) + self.shift(t)


class HutchinsonFlow(eqx.Module):
    """The augmented field of [z, Δ]: [f(t, z), εᵀ(∂f/∂z)ε], noise ε passed as args."""

    layers: list[ConcatSquashLinear]

    def __init__(self, dim, hidden, *, key):
        sizes = [dim, hidden, hidden, dim]
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [
            ConcatSquashLinear(i, o, key=k)
            for i, o, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        ]

    def field(self, t, z):
        def single(x):
            for layer in self.layers[:-1]:
                x = jax.nn.softplus(layer(t, x))
            return self.layers[-1](t, x)

        return jax.vmap(single)(z)

    def __call__(self, t, y, noise):
        z = y[:, :-1]
        dz, jvp = jax.jvp(lambda z: self.field(t, z), (z,), (noise,))
        trace = jnp.sum(noise * jvp, axis=-1)
        return jnp.concatenate([dz, trace[:, None]], axis=-1)


def synthetic_batch(batch, key):
    """Points from a mixture of 8 Gaussians in 43 dimensions, and Gaussian noise."""
    kc, kx, kn, km = jax.random.split(key, 4)
    means = 2.0 * jax.random.normal(km, (8, DIM))
    centre = means[jax.random.randint(kc, (batch,), 0, 8)]
    x = centre + 0.5 * jax.random.normal(kx, (batch, DIM))
    return x, jax.random.normal(kn, (batch, DIM))


def negative_log_likelihood(flow, x, noise, adjoint, max_steps):
    y0 = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=-1)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(flow),
        adjoint.wrap(diffrax.Dopri5())
        if isinstance(adjoint, neuralode.ReversibleAdjoint)
        else diffrax.Dopri5(),
        0.0,
        1.0,
        None,
        y0,
        args=noise,
        stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
        adjoint=adjoint,
        max_steps=max_steps,
    )
    z1, delta = sol.ys[-1, :, :-1], sol.ys[-1, :, -1]
    log_base = -0.5 * jnp.sum(z1**2, axis=-1) - 0.5 * DIM * jnp.log(2 * jnp.pi)
    return -jnp.mean(log_base + delta), sol.stats["num_steps"]


def strategies(steps_taken):
    """The candidates, and the max_steps each is given: Diffrax's default (4096) for
    every strategy whose cost follows the steps taken, and for backprop, whose memory
    follows max_steps, the next power of two above twice the steps taken (its
    docstring's advice)."""
    sized = int(2 ** np.ceil(np.log2(2 * steps_taken)))
    return {
        "backprop": (neuralode.BackpropAdjoint(), sized),
        "continuous": (neuralode.ContinuousAdjoint(), 4096),
        "symplectic": (neuralode.SymplecticAdjoint(), 4096),
        "symplectic (every step)": (
            neuralode.SymplecticAdjoint(checkpoints="all"),
            sized,
        ),
        "RecursiveCheckpointAdjoint()": (diffrax.RecursiveCheckpointAdjoint(), 4096),
        "DirectAdjoint()": (diffrax.DirectAdjoint(), sized),
        # A different discretisation (the reversible pair over Dopri5 steps).
        "reversible": (neuralode.ReversibleAdjoint(), 4096),
    }


def gradient_fn(adjoint, max_steps):
    def loss(flow, x, noise):
        return negative_log_likelihood(flow, x, noise, adjoint, max_steps)[0]

    return eqx.filter_jit(eqx.filter_grad(loss))


def xla_bytes(fn, *args) -> int:
    """Arguments, outputs and temporaries of the compiled gradient."""
    return neuralode.measure.compiled_total_bytes(fn.lower(*args).compile().compiled)


def measure(size: dict) -> dict:
    flow = HutchinsonFlow(DIM, size["hidden"], key=jax.random.PRNGKey(0))
    x, noise = synthetic_batch(size["batch"], jax.random.PRNGKey(1))
    probe = eqx.filter_jit(negative_log_likelihood)
    _, steps = probe(flow, x, noise, diffrax.RecursiveCheckpointAdjoint(), 4096)
    steps = int(steps)
    print(f"Dopri5 takes {steps} steps on the initial flow", flush=True)
    fns, rows = {}, []
    for name, (adjoint, max_steps) in strategies(steps).items():
        fn = gradient_fn(adjoint, max_steps)
        try:
            nbytes = xla_bytes(fn, flow, x, noise)
        except Exception as error:  # noqa: BLE001  (e.g. out of memory: listed)
            rows.append(dict(strategy=name, max_steps=max_steps, skipped=repr(error)))
            continue
        fns[name] = fn
        rows.append(dict(strategy=name, max_steps=max_steps, xla_bytes=nbytes))
        print(f"{name}: {nbytes / 2**20:.1f} MiB (XLA)", flush=True)
    forward = eqx.filter_jit(
        lambda flow, x, noise: negative_log_likelihood(
            flow, x, noise, diffrax.RecursiveCheckpointAdjoint(), 4096
        )[0]
    )
    times = timing.median_iqr(
        {"forward solve": forward, **fns}, (flow, x, noise), size["repeats"]
    )
    rows.insert(
        0,
        dict(
            strategy="forward solve (no gradient)",
            max_steps=4096,
            **times["forward solve"],
        ),
    )
    for row in rows:
        row.update(times.get(row["strategy"], {}))
    return dict(steps_taken=steps, rows=rows)


def render(result: dict) -> str:
    mib = 2**20
    lines = [
        f"# A paper-sized CNF (FFJORD MINIBOONE shape) on {result['device']}",
        "",
        f"Dimension {DIM}, MLP {result['hidden']}-{result['hidden']} concat-squash, "
        f"softplus, Dopri5 (rtol {RTOL:g}, atol {ATOL:g}), batch {result['batch']}, "
        f"Hutchinson trace; the initial flow takes {result['steps_taken']} steps. "
        "One iteration = the jitted gradient of the negative log-likelihood.",
        "",
        "| strategy | max_steps | memory (MiB, XLA) | time per iteration (s) | "
        "× forward solve |",
        "|---|---|---|---|---|",
    ]
    forward_ms = result["rows"][0]["ms"]
    for r in result["rows"]:
        cells = [r["strategy"], str(r.get("max_steps", "–"))]
        if "xla_bytes" not in r and "skipped" not in r:  # the forward solve
            cells += ["–", f"{r['ms'] / 1e3:.3f} (IQR {r['iqr_ms'] / 1e3:.3f})", "1"]
        elif "skipped" in r:
            cells += [f"not measured: {r['skipped']}", "–", "–"]
        else:
            cells += [
                f"{r['xla_bytes'] / mib:.1f}",
                f"{r['ms'] / 1e3:.3f} (IQR {r['iqr_ms'] / 1e3:.3f})",
                f"{r['ms'] / forward_ms:.1f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", PAPER_NOTE]
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def run(quick: bool) -> dict:
    size = SIZES["quick" if quick else "full"]
    start = time.perf_counter()
    result = dict(**size, **measure(size))
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


if __name__ == "__main__":
    script.main("cnf_tabular", __doc__.split("\n\n")[0], run, render)
