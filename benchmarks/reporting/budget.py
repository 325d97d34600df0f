"""How long a plan takes, estimated before anything runs, and the plan cut to a budget.

The cost model is deliberately plain: a fixed cost per program compiled (`compiles`),
divided among the threads; each gradient's run in evaluations of f (a vector-Jacobian
product counted as two), times a cost per evaluation of `overhead + flops / rate`;
every timed run `repeats + 2` times, with one forward solve per problem and round. The
constants come from committed runs: on the 2-core CPU the quick plan's 52
configurations (about 130 programs) took about 6.4 minutes with 2 threads, and Tsit5's
`symplectic` 14 µs per evaluation of the 32-wide MLP over 16 states
(`results/cpu/results.json`); on an H100 compiles took about 12 s with 8 threads
beside 8 compiling peak processes (8 s assumed alone), and every evaluation cost about
27 µs whatever its size (kernel launches; `results/nvidia-h100-80gb-hbm3/results.json`),
torchdiffeq's about 300 µs. The GPU constants have not been checked against a run of
the present plan."""

import math

from reporting.problems import config_key, group_key, network_key
from reporting.strategies import TORCH, ladder, schedule_depends_on_max_steps

# backend: (compile s, overhead s per evaluation, flop/s, torch s per evaluation)
COSTS = {"cpu": (4.5, 2e-6, 4e9, 1e-4), "gpu": (8.0, 27e-6, 2e13, 3e-4)}
STAGES = {"heun": 2, "bosh3": 4, "tsit5": 7, "dopri5": 7, "dopri8": 14, "rk4": 4}


# Steps an adaptive solve of the plan is assumed to take (its rows record the count).
ADAPTIVE_STEPS = 8


def steps_taken(c: dict) -> int:
    return c["n_steps"] if c.get("tol") is None else ADAPTIVE_STEPS


def sweeps_over(n_steps: int, checkpoints: int) -> int:
    """Forward sweeps of binomial checkpointing with `checkpoints` over n steps: the
    smallest r with C(checkpoints + r, r) ≥ n."""
    r = 1
    while math.comb(checkpoints + r, r) < n_steps:
        r += 1
    return r


def evaluations(c: dict) -> float:
    """Cost of one gradient in evaluations of f (a VJP counted as two)."""
    ns = steps_taken(c) * STAGES[c["solver"]]
    strategy = c["strategy"]
    rung = ladder(strategy)
    if strategy == "diffrax_rca":  # Diffrax's default checkpoints, from max_steps
        n = c["n_steps"]
        rung = ("diffrax_rca", math.floor(-1.5 + math.sqrt(2 * n + 0.25)) + 1)
    if rung is not None:
        return ns * (1 + sweeps_over(steps_taken(c), rung[1]) + 2)
    return ns * {"backprop": 3, "diffrax_direct": 5}.get(strategy, 4)


def seconds_per_evaluation(c: dict, backend: str) -> float:
    _, overhead, rate, torch_s = COSTS.get(backend, COSTS["cpu"])
    if c["strategy"] in TORCH:
        return torch_s
    width, state = c["width"], c["state_dim"]
    flops = 2 * c["batch"] * (2 * state * width + (c["depth"] - 1) * width * width)
    return overhead + flops / rate * (2 if c["dtype"] == "float64" else 1)


def compiles(configs: list[dict]) -> int:
    """Programs compiled to measure `configs`: each gradient; per problem its forward
    solve and float64 reference; per network the converged reference; the evaluation
    counts (per strategy and solver, or per configuration where the schedule depends on
    `max_steps` or the steps are adaptive); and the tolerance sweep's 5."""
    counts = {
        (c["strategy"], c["solver"])
        if c.get("tol") is None and not schedule_depends_on_max_steps(c["strategy"])
        else config_key(c)
        for c in configs
    }
    # An adaptive problem also counts its primal solve's evaluations, once.
    adaptive = len({group_key(c) for c in configs if c.get("tol") is not None})
    return (
        len(configs)
        + adaptive
        + 2 * len({group_key(c) for c in configs})
        + len({network_key(c) for c in configs})
        + len(counts)
        + len({c["solver"] for c in configs})  # the primal counts
        + 5
    )


def estimate_s(configs: list[dict], backend: str, threads: int, repeats: int) -> float:
    """Estimated wall time of measuring `configs` (distinct ones)."""
    compile_s = COSTS.get(backend, COSTS["cpu"])[0]
    jax_configs = [c for c in configs if c["strategy"] not in TORCH]
    total = compile_s * compiles(jax_configs) / max(threads, 1)
    forward_s = {}
    for c in configs:
        run_s = evaluations(c) * seconds_per_evaluation(c, backend)
        per_evaluation = run_s / evaluations(c)
        forward_s[group_key(c)] = per_evaluation * steps_taken(c) * STAGES[c["solver"]]
        total += (repeats + 2) * run_s + 2 * run_s  # + errors, counts
    total += (repeats + 2) * sum(forward_s.values())  # one per problem and round
    if backend == "gpu":  # the peak processes compile and run everything once more
        total += compile_s * len(jax_configs) / 8
    return total


def fit(configs: list[dict], budget_s: float, **kw) -> tuple[list, list]:
    """(kept, cut): the longest prefix of the plan (its priority order) whose estimate
    fits 90% of `budget_s`, and the rest."""
    keep = len(configs)
    while keep and estimate_s(configs[:keep], **kw) > 0.9 * budget_s:
        keep -= 1
    return configs[:keep], configs[keep:]
