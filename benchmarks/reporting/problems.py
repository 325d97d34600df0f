"""The problem every row solves, the sizes of the two modes, and the plan.

dy/dt = MLP(y) (tanh, `depth` hidden layers of `width`), y ∈ R^state_dim for a batch of
states, t ∈ [0, 1], constant steps dt = 1/n, loss = ½·mean(y(1)²), gradient with respect
to the MLP's parameters and y0. Weights and y0 come from NumPy's generator, so that
torchdiffeq solves the very same problem. `plan` is pure Python, so that worker
processes can start before JAX does.
"""

import numpy as np

from reporting.strategies import ADAPTIVE, CORE

T1 = 1.0
# The tolerance sweep integrates longer, so that the adaptive solver's step count (and
# error) actually depends on the tolerance: over [0, 1] this field is so smooth that
# Tsit5 meets rtol = 1e-2 and 1e-7 with the same few steps.
T1_TOLERANCE = 8.0
MATMUL_PRECISION = "highest"
# The adaptive sweep: PID-controlled Tsit5 at this tolerance takes a few steps on [0, T1]
# (nfe fwd / stages of its rows), far fewer than its `max_steps`.
ADAPTIVE_TOL = 1e-6

SIZES = {
    "quick": dict(
        state_dim=8,
        batch=16,
        width=32,
        depth=2,
        solver="tsit5",
        n_sweep=(16, 128, 1024),
        n_base=128,
        depths=(2, 4),
        widths=(32, 64),
        solvers=("heun", "tsit5"),
        tols=(1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8),
        peers_n=("diffrax_rca_n",),
        peers_n_steps=(1024,),
        float64_strategies=("diffrax_rca_n",),
        plane_steps=(256,),
        ladder=(4, 32),
        adaptive_max_steps=(64, 4096),
        adaptive_strategies=ADAPTIVE,
        float64_n_strategies=("symplectic", "continuous"),
        precision_strategies=("backprop", "symplectic"),
        batches=(64,),
        state_dims=(32,),
        repeats=11,
        budget_s=480,
    ),
    # Sized so that the whole plan fits report.py's share of gpu.sh (300 s) on one
    # H100/H200 by `budget.estimate_s`.
    "full": dict(
        state_dim=32,
        batch=256,
        width=128,
        depth=2,
        solver="tsit5",
        n_sweep=(8, 32, 128, 512),
        n_base=32,
        depths=(2, 8),
        widths=(128, 512),
        solvers=("heun", "tsit5", "dopri8"),
        tols=(1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8),
        # Diffrax's peers are on the plane; RCA(n), which keeps every step, also here.
        peers_n=("diffrax_rca_n",),
        peers_n_steps=(512,),
        float64_strategies=(),
        plane_steps=(128,),
        ladder=(4, 32),
        adaptive_max_steps=(64, 4096),
        adaptive_strategies=("backprop", "symplectic_default", "diffrax_rca"),
        float64_n_strategies=("symplectic", "continuous"),
        precision_strategies=("backprop", "symplectic"),
        batches=(256, 1024),
        state_dims=(32, 128),
        repeats=11,
        budget_s=300,
    ),
}
# Sweeps over a single variable of the base configuration: (sweep, size key, field).
SINGLE = (
    ("m", "depths", "depth"),
    ("d", "widths", "width"),
    ("s", "solvers", "solver"),
)
SIZE_SWEEPS = (("b", "batches", "batch"), ("y", "state_dims", "state_dim"))


def plane_strategies(sizes: dict) -> tuple:
    """Every exact strategy and peer on the time–memory plane, with the ladder."""
    rungs = sizes["ladder"]
    return (
        ("backprop", "symplectic")
        + tuple(f"symplectic_c{c}" for c in rungs)
        + ("diffrax_rca", "diffrax_rca_n", "diffrax_direct")
        + tuple(f"diffrax_rca_c{c}" for c in rungs)
        + ("torch_odeint",)  # odeint_adjoint is not exact, so not on the plane
    )


def plan(sizes: dict) -> list[dict]:
    """Every configuration to measure, in the order of priority. Each is a dict with
    `sweep`, `strategy`, `solver`, `n_steps`, `depth`, `width`, `batch`, `state_dim`,
    `dtype`, `tol` (None: n constant steps; else adaptive steps at rtol = atol = tol, at
    most `n_steps` of them) and `precision` (JAX's matmul precision)."""
    base = dict(
        solver=sizes["solver"],
        n_steps=sizes["n_base"],
        depth=sizes["depth"],
        width=sizes["width"],
        batch=sizes["batch"],
        state_dim=sizes["state_dim"],
        dtype="float32",
        tol=None,
        precision=MATMUL_PRECISION,
    )
    configs = []

    def add(sweep, strategies, **changes):
        for strategy in strategies:
            configs.append(dict(base, sweep=sweep, strategy=strategy, **changes))

    for n in sizes["n_sweep"]:
        add("n", CORE, n_steps=n)
    # float64: symplectic for every solver (its error must reach float64 rounding);
    # float64 backprop is the reference itself, so it is not repeated as a row.
    for solver in sizes["solvers"]:
        add("float64", ("symplectic",), dtype="float64", solver=solver)
    add("float64", sizes["float64_strategies"], dtype="float64")
    n_max = max(sizes["n_sweep"])
    add("float64_n", sizes["float64_n_strategies"], dtype="float64", n_steps=n_max)
    # The plane: RK4, the solver torchdiffeq runs, on both sides.
    for n in sizes["plane_steps"]:
        add("plane", plane_strategies(sizes), solver="rk4", n_steps=n)
    for strategy in sizes["peers_n"]:
        for n in sizes["peers_n_steps"]:
            add("n", (strategy,), n_steps=n)
    # Adaptive: the cost of each gradient should follow the steps taken, not max_steps.
    for max_steps in sizes["adaptive_max_steps"]:
        add(
            "adaptive",
            sizes["adaptive_strategies"],
            solver="tsit5",
            tol=ADAPTIVE_TOL,
            n_steps=max_steps,
        )
    # JAX's default matmul precision (TF32 products on NVIDIA GPUs) beside `highest`.
    for precision in (MATMUL_PRECISION, "default"):
        add("precision", sizes["precision_strategies"], precision=precision)
    for sweep, key, field in SINGLE:
        for value in sizes[key]:
            add(sweep, CORE, **{field: value})
    for sweep, key, field in SIZE_SWEEPS:
        for value in sizes[key]:
            add(sweep, CORE, **{field: value})
    return configs


def config_key(c: dict) -> tuple:
    return (c["strategy"],) + group_key(c)


def group_key(c: dict) -> tuple:
    """Everything but the strategy: configurations of one group solve the same problem
    and are timed interleaved."""
    return (
        c["solver"],
        c["n_steps"],
        c["depth"],
        c["width"],
        c["batch"],
        c["state_dim"],
        c["dtype"],
        c.get("tol"),  # older results.json rows have neither
        c.get("precision", MATMUL_PRECISION),
    )


def network_key(c: dict) -> tuple:
    return (c["depth"], c["width"], c["batch"], c["state_dim"])


def numpy_problem(c: dict, seed: int = 0):
    """Weights [(W, b), ...] of the MLP (eqx/torch layout: W is out × in) and y0, float64,
    initialised like `eqx.nn.Linear`: uniform(±1/√fan_in)."""
    rng = np.random.default_rng(seed + 1000 * c["depth"] + c["width"])
    sizes = [c["state_dim"]] + [c["width"]] * c["depth"] + [c["state_dim"]]
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        bound = 1 / np.sqrt(fan_in)
        layers.append(
            (
                rng.uniform(-bound, bound, (fan_out, fan_in)),
                rng.uniform(-bound, bound, (fan_out,)),
            )
        )
    y0 = np.random.default_rng(seed).standard_normal((c["batch"], c["state_dim"]))
    return layers, y0
