"""One gradient of every strategy, as a multiple of the forward solve.

The setting: f = MLP(32 → 128 → 128 → 32, tanh) applied to a batch of 256 states, float32,
Tsit5 on t ∈ [0, 1], loss ½·mean(y(1)²), gradient with respect to the MLP's parameters
and y0. Two problems:

- `constant`: 256 constant steps, `max_steps=256` (every allocated step is taken);
- `adaptive`: `PIDController(rtol=1e-5, atol=1e-5)` from dt0 = 0.1, which takes 3 steps,
  at several `max_steps`: a gradient whose time follows the steps taken barely changes
  with `max_steps`.

Each problem's functions (the forward solve, without a gradient, and one gradient per
strategy) are compiled first, recording XLA's temp bytes; a gradient needing more than
`--max-temp-gib` is skipped and listed. The rest are timed in interleaved rounds
(forward, strategy 1, strategy 2, ..., forward, ...), so that drifts of the machine hit
all alike, and each gradient's time is divided by the forward solve's time of its round.
Reported: median and interquartile range of the times and of these multiples, and each
gradient's relative difference from `RecursiveCheckpointAdjoint()`'s. `reversible`
solves with `neuralode.Reversible(Tsit5())`, another discretisation: its multiple is
of the same (plain Tsit5) forward solve, its difference from
`RecursiveCheckpointAdjoint()` on `Reversible(Tsit5())`, also timed.

    python benchmarks/speed.py [--repeats N] [--json FILE] [--quick]
    python benchmarks/speed.py --render FILE    # the README's table from a results file
"""

import argparse
import json
import os
import platform
import sys
import time

import diffrax
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from reporting import timing

import neuralode
import neuralode.measure

# (name, adjoint for a solve of at most `max_steps` steps), timed on every problem.
# Append new strategies here.
STRATEGIES = [
    ("backprop", lambda max_steps: neuralode.BackpropAdjoint()),
    ("symplectic", lambda max_steps: neuralode.SymplecticAdjoint()),
    (
        "symplectic_all",
        lambda max_steps: neuralode.SymplecticAdjoint(checkpoints="all"),
    ),
    (
        "symplectic_all_step_activations",
        lambda max_steps: neuralode.SymplecticAdjoint(
            checkpoints="all", step_activations=True
        ),
    ),
    ("continuous", lambda max_steps: neuralode.get_adjoint("continuous")),
    (
        "diffrax_rca_n",
        lambda max_steps: diffrax.RecursiveCheckpointAdjoint(checkpoints=max_steps),
    ),
    ("diffrax_rca", lambda max_steps: diffrax.RecursiveCheckpointAdjoint()),
    ("reversible", lambda max_steps: neuralode.ReversibleAdjoint()),
    (
        "diffrax_rca_reversible",
        lambda max_steps: diffrax.RecursiveCheckpointAdjoint(),
    ),
]
TSIT5 = diffrax.Tsit5()
REFERENCE = "diffrax_rca"  # the gradient the others are compared with
# Strategies that solve with `neuralode.Reversible(Tsit5())` (another discretisation),
# and the gradient each is compared with instead of REFERENCE's.
REVERSIBLE = {"reversible": "diffrax_rca_reversible", "diffrax_rca_reversible": None}
LABELS = {
    "backprop": "`backprop`",
    "symplectic": "`symplectic`",
    "symplectic_all": "`symplectic`, every step",
    "symplectic_all_step_activations": "`symplectic`, every step, step activations",
    "continuous": "`continuous`",
    "diffrax_rca_n": "`RecursiveCheckpointAdjoint(checkpoints=n)`",
    "diffrax_rca": "`RecursiveCheckpointAdjoint()`",
    "reversible": "`reversible` (on `Reversible(Tsit5())`)",
    "diffrax_rca_reversible": "`RecursiveCheckpointAdjoint()` on `Reversible(Tsit5())`",
    "scan_tsit5_step": "`lax.scan` over `Tsit5().step`",
    "scan_unrolled_tsit5": "hand-written Tsit5 in `lax.scan`",
}

SIZES = {
    "full": dict(
        state=32,
        width=128,
        depth=2,
        batch=256,
        steps=256,
        adaptive_max_steps=(128, 256, 4096, 16384),
        repeats=dict(constant=5, adaptive=11),
    ),
    "quick": dict(
        state=4,
        width=8,
        depth=1,
        batch=4,
        steps=8,
        adaptive_max_steps=(16, 64),
        repeats=dict(constant=3, adaptive=3),
    ),
}


class Problem:
    """A solve and its loss, as functions of (parameters, y0)."""

    def __init__(self, name, static, *, max_steps, steps=None):
        self.name, self.static, self.max_steps = name, static, max_steps
        if steps is None:
            self.dt0, self.controller = 0.1, diffrax.PIDController(rtol=1e-5, atol=1e-5)
        else:
            self.dt0, self.controller = 1.0 / steps, diffrax.ConstantStepSize()

    def solve(self, params, y0, adjoint, solver=TSIT5):
        t0, t1, dt0 = (jnp.asarray(t, y0.dtype) for t in (0.0, 1.0, self.dt0))
        return diffrax.diffeqsolve(
            diffrax.ODETerm(eqx.combine(params, self.static)),
            solver,
            t0,
            t1,
            dt0,
            y0,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=self.controller,
            adjoint=adjoint,
            max_steps=self.max_steps,
        )

    def loss(self, params, y0, adjoint, solver=TSIT5):
        return 0.5 * jnp.mean(self.solve(params, y0, adjoint, solver).ys[-1] ** 2)

    def forward(self):
        return jax.jit(
            lambda p, y: self.loss(p, y, diffrax.RecursiveCheckpointAdjoint())
        )

    def gradient(self, adjoint, solver=TSIT5):
        return jax.jit(
            jax.grad(lambda p, y: self.loss(p, y, adjoint, solver), argnums=(0, 1))
        )

    def strategy_gradient(self, name, make):
        """The gradient of the strategy `name` of STRATEGIES, made by `make`."""
        solver = neuralode.Reversible(TSIT5) if name in REVERSIBLE else TSIT5
        return self.gradient(make(self.max_steps), solver)


def scan_references(static, steps):
    """Gradients of the constant-step solve by `lax.scan` over steps, as references:
    over `diffrax.Tsit5().step` (its stages in Diffrax's checkpointed loop), and over a
    hand-written Tsit5 step with its stages unrolled (everything stored)."""
    solver, dt = diffrax.Tsit5(), 1.0 / steps
    tableau = solver.tableau

    def diffrax_steps(field, y):
        term = diffrax.ODETerm(field)

        def step(carry, t0):
            y, state = carry
            y, _, _, state, _ = solver.step(term, t0, t0 + dt, y, None, state, False)
            return (y, state), None

        state = solver.init(term, 0.0, dt, y, None)
        return lax.scan(step, (y, state), dt * jnp.arange(steps, dtype=y.dtype))[0][0]

    def unrolled_steps(field, y):
        def step(carry, t0):
            y, k0 = carry
            ks = [k0]
            for c, a in zip(tableau.c, tableau.a_lower, strict=True):
                y_i = y + dt * sum(float(a_j) * k for a_j, k in zip(a, ks, strict=True))
                ks.append(field(t0 + float(c) * dt, y_i))
            return (y_i, ks[-1]), None  # Tsit5: the last stage is at y1 (FSAL)

        ts = dt * jnp.arange(steps, dtype=y.dtype)
        return lax.scan(step, (y, field(0.0, y)), ts)[0][0]

    def gradient(scan):
        def loss(params, y0):
            y1 = scan(eqx.combine(params, static), y0)
            return 0.5 * jnp.mean(y1**2)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    return {
        "scan_tsit5_step": gradient(diffrax_steps),
        "scan_unrolled_tsit5": gradient(unrolled_steps),
    }


def compile_all(fns, params, y0, max_temp_bytes):
    """XLA's temp bytes of each function; those above `max_temp_bytes` are dropped
    from `fns` and listed as skipped."""
    temp, skipped = {}, []
    for name, fn in list(fns.items()):
        temp[name] = neuralode.measure.compiled_temp_bytes(
            fn.lower(params, y0).compile()
        )
        if temp[name] > max_temp_bytes:
            del fns[name]
            reason = f"XLA temp {temp[name] / 2**30:.1f} GiB above --max-temp-gib"
            skipped.append(
                dict(strategy=name, reason=reason, xla_temp_bytes=temp[name])
            )
    return temp, skipped


def measure(problem, gradients, params, y0, repeats, max_temp_bytes):
    """The forward solve and `gradients` (name -> jitted gradient) on one problem:
    the problem's entry of the results."""
    fns = {"forward": problem.forward(), **gradients}
    temp, skipped = compile_all(fns, params, y0, max_temp_bytes)
    outputs, times = timing.time_interleaved(fns, (params, y0), repeats)
    median, q25, q75 = timing.quartiles(times["forward"])
    forward = dict(
        median_ms=median, q25_ms=q25, q75_ms=q75, xla_temp_bytes=temp["forward"]
    )
    sol = problem.solve(params, y0, diffrax.RecursiveCheckpointAdjoint())
    entry = dict(
        name=problem.name,
        max_steps=problem.max_steps,
        num_steps=int(sol.stats["num_steps"]),
        repeats=repeats,
        forward=forward,
        results=[],
        skipped=skipped,
    )
    for name in gradients:
        if name not in fns:
            continue
        median, q25, q75 = timing.quartiles(times[name])
        ratio, ratio_q25, ratio_q75 = timing.quartiles(times[name] / times["forward"])
        reference = outputs.get(REVERSIBLE.get(name, REFERENCE))
        difference = None
        if reference is not None:
            difference = neuralode.measure.relative_error(outputs[name], reference)
        entry["results"].append(
            dict(
                strategy=name,
                median_ms=median,
                q25_ms=q25,
                q75_ms=q75,
                ratio=ratio,
                ratio_q25=ratio_q25,
                ratio_q75=ratio_q75,
                xla_temp_bytes=temp[name],
                grad_rel_difference=difference,
            )
        )
    return entry


def plan(sizes, static):
    """(problem, extra gradients) in the order they are measured."""
    steps = sizes["steps"]
    constant = Problem("constant", static, max_steps=steps, steps=steps)
    yield constant, scan_references(static, steps)
    for max_steps in sizes["adaptive_max_steps"]:
        yield Problem("adaptive", static, max_steps=max_steps), {}


def _problem_label(entry):
    if entry["name"] == "constant":
        return f"{entry['num_steps']} constant steps, max_steps {entry['max_steps']}"
    return f"adaptive ({entry['num_steps']} steps), max_steps {entry['max_steps']}"


def render(result) -> str:
    """The README's tables: every gradient as a multiple of the forward solve (median,
    and interquartile range over the rounds), then XLA's temp memory."""
    names = []
    for entry in result["problems"]:
        for row in entry["results"] + entry["skipped"]:
            if row["strategy"] not in names:
                names.append(row["strategy"])
    head = "| problem | forward solve | " + " | ".join(LABELS.get(n, n) for n in names)
    rule = "|---" * (len(names) + 2) + "|"
    speed, memory = [head + " |", rule], [head + " |", rule]
    for entry in result["problems"]:
        rows = {r["strategy"]: r for r in entry["results"]}
        skipped = {r["strategy"]: r for r in entry["skipped"]}
        forward = entry["forward"]
        cells_t, cells_m = [f"{forward['median_ms']:.1f} ms"], [_mib(forward)]
        for name in names:
            if name in rows:
                r = rows[name]
                cells_t.append(
                    f"{r['ratio']:.2f}× ({r['ratio_q25']:.2f}–{r['ratio_q75']:.2f})"
                )
                cells_m.append(_mib(r))
            elif name in skipped:
                cells_t.append("not run")
                cells_m.append(_mib(skipped[name]))
            else:
                cells_t.append("–")
                cells_m.append("–")
        label = _problem_label(entry)
        speed.append(f"| {label} | " + " | ".join(cells_t) + " |")
        memory.append(f"| {label} | " + " | ".join(cells_m) + " |")
    return (
        "\n".join(speed)
        + "\n\nXLA temp memory of the same functions:\n\n"
        + "\n".join(memory)
    )


def _mib(row):
    return f"{row['xla_temp_bytes'] / 2**20:.1f} MiB"


def median_times(result) -> list[tuple[str, dict[str, float]]]:
    """(problem, {strategy: median ms}) of a results file, also of the earlier format
    (`symplectic` against `RecursiveCheckpointAdjoint(checkpoints=n)` only)."""
    if "problems" not in result:
        return [
            (
                "symplectic vs RCA(n)",
                dict(
                    symplectic=result["symplectic_ms"], diffrax_rca_n=result["rca_n_ms"]
                ),
            )
        ]
    return [
        (_problem_label(e), {r["strategy"]: r["median_ms"] for r in e["results"]})
        for e in result["problems"]
    ]


def print_entry(entry):
    print(
        f"\n{_problem_label(entry)}: forward solve {entry['forward']['median_ms']:.1f} ms"
    )
    for r in entry["results"]:
        diff = r["grad_rel_difference"]
        print(
            f"  {r['strategy']:22s} {r['median_ms']:10.1f} ms  {r['ratio']:7.2f}× "
            f"({r['ratio_q25']:.2f}–{r['ratio_q75']:.2f})  "
            f"temp {r['xla_temp_bytes'] / 2**20:9.1f} MiB  "
            f"vs {REVERSIBLE.get(r['strategy'], REFERENCE) or 'itself'}: "
            f"{'-' if diff is None else f'{diff:.1e}'}",
            flush=True,
        )
    for r in entry["skipped"]:
        print(f"  {r['strategy']:22s} skipped: {r['reason']}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None, help="rounds per problem")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes (a smoke test)"
    )
    parser.add_argument("--max-temp-gib", type=float, default=4.0)
    parser.add_argument("--render", metavar="FILE", help="print the tables of FILE")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            print(render(json.load(f)))
        return None

    start = time.perf_counter()
    sizes = SIZES["quick" if args.quick else "full"]
    field = neuralode.MLPField(
        sizes["state"], sizes["width"], sizes["depth"], key=jax.random.PRNGKey(0)
    )
    params, static = eqx.partition(field, eqx.is_array)
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
    shape = (sizes["batch"], sizes["state"])
    y0 = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float32)
    result = dict(
        command="python benchmarks/speed.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        device=str(jax.devices()[0].device_kind),
        backend=jax.default_backend(),
        cpu_count=os.cpu_count(),
        jax=jax.__version__,
        diffrax=diffrax.__version__,
        equinox=eqx.__version__,
        python=platform.python_version(),
        sizes={k: v for k, v in sizes.items()},
        problems=[],
    )
    print(
        f"device {result['device']} ({os.cpu_count()} cores), jax {jax.__version__}; "
        f"Tsit5, MLP({sizes['state']}->{sizes['width']}x{sizes['depth']}->"
        f"{sizes['state']}, tanh), batch {sizes['batch']}, float32"
    )
    for problem, references in plan(sizes, static):
        gradients = {
            name: problem.strategy_gradient(name, make) for name, make in STRATEGIES
        }
        gradients.update(references)
        repeats = args.repeats or sizes["repeats"][problem.name]
        entry = measure(
            problem, gradients, params, y0, repeats, args.max_temp_gib * 2**30
        )
        result["problems"].append(entry)
        print_entry(entry)
    result["wall_s"] = time.perf_counter() - start
    print(f"\n{render(result)}\n\n{result['wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
