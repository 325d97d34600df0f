"""How long a plan takes, estimated before anything runs, and the plan cut to a budget.

The cost model is deliberately plain: compilation at a fixed cost per compile, three
per configuration, divided among the threads; each gradient's run in evaluations of f (a vector-Jacobian product counted as
two), times a cost per evaluation of `overhead + flops / rate`; every timed run
`repeats + 2` times. The constants come from committed runs: on the 2-core CPU a
quick-mode configuration took 6.5 s all told with 2 threads and Tsit5's `symplectic` 14 µs per evaluation of the
32-wide MLP over 16 states (`results/cpu/results.json`); on an H100 compiles took
about 12 s with 8 threads beside 8 compiling peak processes (8 s assumed alone), and
every evaluation cost about 27 µs whatever its size
(kernel launches; `results/nvidia-h100-80gb-hbm3/results.json`), torchdiffeq's about
300 µs."""

import math

from reporting.strategies import TORCH, ladder

# backend: (compile s, overhead s per evaluation, flop/s, torch s per evaluation)
COSTS = {"cpu": (4.0, 2e-6, 4e9, 1e-4), "gpu": (8.0, 27e-6, 2e13, 3e-4)}
STAGES = {"heun": 2, "bosh3": 4, "tsit5": 7, "dopri5": 7, "dopri8": 14, "rk4": 4}


def sweeps_over(c: dict, checkpoints: int) -> int:
    """Forward sweeps of binomial checkpointing with `checkpoints` over n steps: the
    smallest r with C(checkpoints + r, r) ≥ n."""
    r = 1
    while math.comb(checkpoints + r, r) < c["n_steps"]:
        r += 1
    return r


def evaluations(c: dict) -> float:
    """Cost of one gradient in evaluations of f (a VJP counted as two)."""
    ns = c["n_steps"] * STAGES[c["solver"]]
    strategy = c["strategy"]
    rung = ladder(strategy)
    if strategy == "diffrax_rca":
        n = c["n_steps"]
        rung = ("diffrax_rca", math.floor(-1.5 + math.sqrt(2 * n + 0.25)) + 1)
    if rung is not None:
        return ns * (1 + sweeps_over(c, rung[1]) + 2)
    return ns * {"backprop": 3, "diffrax_direct": 5}.get(strategy, 4)


def seconds_per_evaluation(c: dict, backend: str) -> float:
    _, overhead, rate, torch_s = COSTS.get(backend, COSTS["cpu"])
    if c["strategy"] in TORCH:
        return torch_s
    width, state = c["width"], c["state_dim"]
    flops = 2 * c["batch"] * (2 * state * width + (c["depth"] - 1) * width * width)
    return overhead + flops / rate * (2 if c["dtype"] == "float64" else 1)


def estimate_s(configs: list[dict], backend: str, threads: int, repeats: int) -> float:
    """Estimated wall time of measuring `configs` (distinct ones)."""
    compile_s = COSTS.get(backend, COSTS["cpu"])[0]
    jax_configs = [c for c in configs if c["strategy"] not in TORCH]
    # Each configuration compiles its gradient, an evaluation count and (shared) a
    # reference or forward solve; the tolerance sweep compiles 6 more.
    total = compile_s * (3 * len(jax_configs) + 6) / max(threads, 1)
    for c in configs:
        run_s = evaluations(c) * seconds_per_evaluation(c, backend)
        forward_s = run_s / evaluations(c) * c["n_steps"] * STAGES[c["solver"]]
        total += (repeats + 2) * (run_s + forward_s) + 2 * run_s  # + errors, counts
    if backend == "gpu":  # the peak process compiles and runs everything once more
        total += compile_s * len(jax_configs) / 8
    return total


def fit(configs: list[dict], budget_s: float, **kw) -> tuple[list, list]:
    """(kept, cut): the longest prefix of the plan (its priority order) whose estimate
    fits 90% of `budget_s`, and the rest."""
    keep = len(configs)
    while keep and estimate_s(configs[:keep], **kw) > 0.9 * budget_s:
        keep -= 1
    return configs[:keep], configs[keep:]
