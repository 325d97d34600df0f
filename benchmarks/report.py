"""Memory, time and gradient error of every gradient strategy, swept over the number of
steps n, the depth m and width d of f_θ, and the stages s of the solver: the measured
version of the cost table of `neuralode`'s strategies.

    python benchmarks/report.py [--quick] [--out DIR]

writes `DIR/results.json`, `DIR/results.md` and PNG plots (default DIR:
`benchmarks/results/<device-kind>/`). Every figure in `results.md` is read from
`results.json`.

The problem: dy/dt = MLP(y) (tanh, `depth` hidden layers of `width`), y ∈ R^state_dim for a
batch of states, t ∈ [0, 1], constant steps dt = 1/n, loss = ½·mean(y(1)²), gradient with
respect to the MLP's parameters and y0. Weights and y0 come from NumPy's generator, so that
torchdiffeq (when it imports) solves the very same problem.

What each row measures:

- `xla_temp_bytes`: XLA's static temporary-buffer figure of the compiled gradient.
- `peak_bytes`: on a GPU, the device peak of the gradient minus the peak after the inputs
    were placed, measured in a fresh process per configuration, in a preallocated pool
    (see `measure_peaks`) with `XLA_FLAGS=--xla_gpu_autotune_level=0` (with autotuning
    on, the compiler's own peak hides the solve). `null` on CPU.
- `time_ms`: median of ≥5 runs after compilation, in this process (autotuning as the
    environment sets it), timed one configuration at a time after everything else ran.
- `grad_rel_error`: against the float64 gradient of the same discretisation (full
    backpropagation in float64, itself checked against `RecursiveCheckpointAdjoint` in the
    float64 rows).
- `grad_rel_error_continuous`: against a converged float64 solve (Dopri8, rtol = atol =
  1e-12).
- `nfe_forward` / `nfe_backward`: evaluations of f counted at run time in a separate,
    untimed compile: the primal solve, and the gradient minus the primal solve.

Float32 matrix products run at `jax_default_matmul_precision="highest"`: JAX's default on
NVIDIA GPUs is TF32, whose rounding would hide the strategies' own errors (torch's default
for float32 matmuls is full float32 too).

Everything but the timings is measured first, several configurations at a time in
threads (compiling is most of the work) while, on a GPU, fresh processes measure the
peaks; then torchdiffeq; then the timings. The budget (`--budget-s`) decides what starts:
configurations are tried in the order of `plan`, and one starts only while the budget
still holds the estimated timings of those already prepared (at most 15% of it).
"""

import argparse
import concurrent.futures
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
T1 = 1.0
# The tolerance sweep integrates longer, so that the adaptive solver's step count (and
# error) actually depends on the tolerance: over [0, 1] this field is so smooth that
# Tsit5 meets rtol = 1e-2 and 1e-7 with the same few steps.
T1_TOLERANCE = 8.0
MATMUL_PRECISION = "highest"

CORE = ("backprop", "continuous", "symplectic")
PEERS = (
    "diffrax_rca",
    "diffrax_rca_n",
    "diffrax_direct",
    "diffrax_backsolve",
)
TORCH = ("torch_odeint", "torch_odeint_adjoint")
# Strategies of the gradient-error-vs-tolerance sweep.
TOLERANCE = ("continuous", "symplectic")
DESCRIPTION = {
    "backprop": "neuralode backprop (`BackpropAdjoint`)",
    "continuous": "neuralode continuous (`ContinuousAdjoint` over `BacksolveAdjoint`)",
    "symplectic": "neuralode symplectic (`SymplecticAdjoint`)",
    "diffrax_rca": "diffrax `RecursiveCheckpointAdjoint()` (default checkpoints)",
    "diffrax_rca_n": "diffrax `RecursiveCheckpointAdjoint(checkpoints=n)`",
    "diffrax_direct": "diffrax `DirectAdjoint()`",
    "diffrax_backsolve": "diffrax `BacksolveAdjoint()`",
    "torch_odeint": "torchdiffeq `odeint` (rk4, fixed grid)",
    "torch_odeint_adjoint": "torchdiffeq `odeint_adjoint` (rk4, fixed grid)",
}
# Promised memory orders (DESIGN.md), and the exponents they imply in n, m, d when the
# term that grows dominates.
PROMISED = {
    "backprop": ("O(n·s·m·d)", 1, 1, 1),
    "continuous": ("O(m·d)", 0, 1, 1),
    "symplectic": ("O(n·d + s·d + m·d)", 1, "≤1", "≤1"),
}

SIZES = {
    "quick": dict(
        state_dim=8,
        batch=16,
        width=32,
        depth=2,
        solver="tsit5",
        n_sweep=(16, 128, 1024),
        n_base=128,
        depths=(1, 2, 4),
        widths=(16, 32, 64),
        solvers=("heun", "tsit5", "dopri8"),
        tols=(1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8),
        peers_n=("diffrax_rca_n",),
        peers_n_steps=(16, 128, 1024),
        peers_other=(),
        float64_strategies=("diffrax_rca_n",),
        repeats=5,
        budget_s=285,
    ),
    "full": dict(
        state_dim=32,
        batch=256,
        width=128,
        depth=2,
        solver="tsit5",
        n_sweep=(16, 64, 256, 1024),
        n_base=64,
        depths=(1, 2, 4, 8),
        widths=(32, 128, 512),
        solvers=("heun", "bosh3", "tsit5", "dopri8"),
        tols=(1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8),
        # The slowest to compile last: the budget cuts from the end.
        peers_n=("diffrax_rca_n", "diffrax_backsolve", "diffrax_direct", "diffrax_rca"),
        peers_n_steps=(64, 256, 1024),
        peers_other=(),
        float64_strategies=("continuous", "diffrax_rca_n"),
        repeats=5,
        budget_s=360,
    ),
}


# ---------------------------------------------------------------------------------------
# The plan: pure Python, so that worker processes can be started before JAX is.


def plan(sizes: dict) -> list[dict]:
    """Every configuration to measure, in the order of priority (the time budget cuts
    from the end). Each is a dict with `sweep`, `strategy`, `solver`, `n_steps`, `depth`,
    `width`, `batch`, `state_dim`, `dtype`."""
    base = dict(
        solver=sizes["solver"],
        n_steps=sizes["n_base"],
        depth=sizes["depth"],
        width=sizes["width"],
        batch=sizes["batch"],
        state_dim=sizes["state_dim"],
        dtype="float32",
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
    for m in sizes["depths"]:
        add("m", CORE + sizes["peers_other"], depth=m)
    for d in sizes["widths"]:
        add("d", CORE + sizes["peers_other"], width=d)
    for solver in sizes["solvers"]:
        add("s", CORE + sizes["peers_other"], solver=solver)
    for strategy in sizes["peers_n"]:
        for n in sizes["peers_n_steps"]:
            add("n", (strategy,), n_steps=n)
    return configs


def config_key(c: dict) -> tuple:
    return (
        c["strategy"],
        c["solver"],
        c["n_steps"],
        c["depth"],
        c["width"],
        c["batch"],
        c["state_dim"],
        c["dtype"],
    )


def numpy_problem(c: dict, seed: int = 0):
    """Weights [(W, b), ...] of the MLP (eqx/torch layout: W is out × in) and y0, float64,
    initialised like `eqx.nn.Linear`: uniform(±1/√fan_in)."""
    rng = np.random.default_rng(seed + 1000 * c["depth"] + c["width"])
    sizes = [c["state_dim"]] + [c["width"]] * c["depth"] + [c["state_dim"]]
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=False):
        bound = 1 / np.sqrt(fan_in)
        layers.append(
            (
                rng.uniform(-bound, bound, (fan_out, fan_in)),
                rng.uniform(-bound, bound, (fan_out,)),
            )
        )
    y0 = np.random.default_rng(seed).standard_normal((c["batch"], c["state_dim"]))
    return layers, y0


# ---------------------------------------------------------------------------------------
# JAX side.


def _jax():
    import jax

    jax.config.update("jax_enable_x64", True)
    # float32 products in float32: on NVIDIA GPUs JAX's default is TF32, whose rounding
    # (about 1e-3) would hide every strategy's own error behind the matmul's.
    jax.config.update("jax_default_matmul_precision", MATMUL_PRECISION)
    return jax


def make_solver(name: str):
    import diffrax

    return {
        "heun": diffrax.Heun,
        "bosh3": diffrax.Bosh3,
        "tsit5": diffrax.Tsit5,
        "dopri5": diffrax.Dopri5,
        "dopri8": diffrax.Dopri8,
    }[name]()


def stages(name: str) -> int:
    """Stages s of the solver's Butcher tableau (evaluations of f per step, FSAL
    included)."""
    solver = make_solver(name)
    return len(solver.tableau.c) + 1


def make_adjoint(strategy: str, n: int, tol=None):
    import diffrax

    import neuralode.measure

    if strategy == "symplectic":  # every step kept: the O(n·d) schedule measured here
        return neuralode.SymplecticAdjoint(checkpoints="all")
    if strategy in neuralode.ADJOINT_NAMES:
        if strategy == "continuous" and tol is not None:
            return neuralode.get_adjoint("continuous", rtol=tol, atol=tol)
        return neuralode.get_adjoint(strategy)
    return {
        "diffrax_rca": lambda: diffrax.RecursiveCheckpointAdjoint(),
        "diffrax_rca_n": lambda: diffrax.RecursiveCheckpointAdjoint(checkpoints=n),
        "diffrax_direct": lambda: diffrax.DirectAdjoint(),
        "diffrax_backsolve": lambda: diffrax.BacksolveAdjoint(),
    }[strategy]()


def jax_problem(c: dict, dtype: str | None = None):
    """(params, static, y0) of configuration `c` as JAX arrays of `dtype`."""
    jax = _jax()
    import equinox as eqx
    import jax.numpy as jnp

    import neuralode.measure

    dtype = jnp.dtype(dtype or c["dtype"])
    layers, y0 = numpy_problem(c)
    field = neuralode.MLPField(
        c["state_dim"], c["width"], c["depth"], key=jax.random.PRNGKey(0)
    )
    for i, (w, b) in enumerate(layers):
        field = eqx.tree_at(
            lambda f, i=i: (f.mlp.layers[i].weight, f.mlp.layers[i].bias),
            field,
            (jnp.asarray(w, dtype), jnp.asarray(b, dtype)),
        )
    params, static = eqx.partition(field, eqx.is_array)
    return params, static, jnp.asarray(y0, dtype)


def loss_fn(
    strategy,
    solver,
    n,
    static,
    dtype,
    *,
    counter=None,
    tol=None,
    max_steps=None,
    throw=None,
    t1=T1,
):
    """loss(params, y0, value) = ½·mean(y(1)²) of the configured solve. With `tol`,
    adaptive steps (PID, rtol = atol = value) from dt0 chosen by Diffrax; otherwise
    constant steps of dt0 = value (default t1/n), at most n of them. `counter`: an
    `EvaluationCounter` that counts the evaluations of f."""
    import diffrax
    import equinox as eqx
    import jax.numpy as jnp

    def loss(params, y0, value=None):
        field = eqx.combine(params, static)
        if counter is not None:
            field = counter.wrap(field)
        if tol is None:
            controller, steps = diffrax.ConstantStepSize(), n
            dt0 = jnp.asarray(t1 / n, dtype) if value is None else value
            adjoint = make_adjoint(strategy, n)
        else:
            controller = diffrax.PIDController(rtol=value, atol=value)
            dt0, steps = None, max_steps
            adjoint = make_adjoint(strategy, steps, tol=value)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            make_solver(solver),
            jnp.asarray(0.0, dtype),
            jnp.asarray(t1, dtype),
            dt0,
            y0,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=steps,
            throw=(tol is None) if throw is None else throw,
        )
        return 0.5 * jnp.mean(sol.ys[-1] ** 2)

    return loss


def grad_fn(loss):
    jax = _jax()
    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def config_gradient(c: dict):
    """(jitted gradient, params, y0) of configuration `c`'s loss."""
    params, static, y0 = jax_problem(c)
    loss = loss_fn(c["strategy"], c["solver"], c["n_steps"], static, c["dtype"])
    return grad_fn(loss), params, y0


def flat_grads(grads) -> list[np.ndarray]:
    """Gradient leaves as float64 NumPy arrays in the order [W1, b1, ..., y0]."""
    jax = _jax()
    return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(grads)]


class Measurer:
    """Measures JAX configurations in this process in two passes: `prepare` (compile,
    XLA's memory figure, gradient errors, evaluation counts; thread-safe, so that
    configurations compile side by side) and `time_ms` (run alone, one configuration at a
    time). References and counts shared between configurations are computed once."""

    def __init__(self, repeats: int, configs: list[dict]):
        self.repeats = repeats
        self.configs = configs
        self._lock = threading.Lock()
        self._once_results = {}

    def _once(self, key, make):
        """`make()`, computed by the first thread that asks for `key`; later askers wait
        for that result (no deadlock: the computing thread is already running)."""
        with self._lock:
            future = self._once_results.get(key)
            owner = future is None
            if owner:
                future = self._once_results[key] = concurrent.futures.Future()
        if owner:
            try:
                future.set_result(make())
            except BaseException as e:
                future.set_exception(e)
        return future.result()

    def exact_reference(self, c):
        """float64 full backprop of the same discretisation."""

        def make():
            g, params, y0 = config_gradient(
                dict(c, strategy="backprop", dtype="float64")
            )
            return flat_grads(g(params, y0))

        key = ("exact", c["solver"], c["n_steps"]) + _network_key(c)
        return self._once(key, make)

    def continuous_reference(self, c, t1=T1):
        """float64 Dopri8 at rtol = atol = 1e-12: the gradient of the ODE itself."""

        def make():
            import jax.numpy as jnp

            params, static, y0 = jax_problem(c, "float64")
            loss = loss_fn(
                "backprop",
                "dopri8",
                None,
                static,
                "float64",
                tol=1e-12,
                max_steps=int(128 * t1),
                throw=True,
                t1=t1,
            )
            return flat_grads(grad_fn(loss)(params, y0, jnp.asarray(1e-12)))

        return self._once(("continuous", t1) + _network_key(c), make)

    def nfe(self, c):
        """(forward, backward) evaluations of f, counted at run time on a small network
        (the count depends on the strategy, solver and n only). One compile serves every
        n of the plan: dt0 is an input and `max_steps` the largest n, which changes no
        count for strategies that store every step; checkpointing schedules
        (`diffrax_rca`, `diffrax_direct`) depend on `max_steps` and get one compile per
        n."""
        per_n = c["strategy"] in ("diffrax_rca", "diffrax_direct")
        ns = (
            (c["n_steps"],)
            if per_n
            else tuple(
                sorted(
                    {
                        p["n_steps"]
                        for p in self.configs
                        if p["strategy"] == c["strategy"] and p["solver"] == c["solver"]
                    }
                    | {c["n_steps"]}
                )
            )
        )
        key = ("nfe", c["strategy"], c["solver"], ns)
        fwd, total = self._once(key, lambda: self._count(c, ns))
        n = c["n_steps"]
        return fwd[n], total[n] - fwd[n]

    def _primal_count(self, solver, ns):
        """Evaluations of f in the primal solve: the same loop for every strategy, so
        one compile serves every n of the plan with this solver."""
        planned = {p["n_steps"] for p in self.configs if p["solver"] == solver}
        ns = tuple(sorted(planned)) if set(ns) <= planned else ns
        c = dict(strategy="diffrax_rca_n", solver=solver)
        return self._once(("primal", solver, ns), lambda: self._count(c, ns, False))

    def _count(self, c, ns, gradient=True):
        """({n: evaluations in the primal solve}, {n: evaluations in the gradient}),
        with max(ns) as `max_steps` and dt0 = 1/n an input."""
        import jax.numpy as jnp

        import neuralode.measure

        jax = _jax()
        small = dict(c, depth=1, width=4, batch=2, state_dim=2, dtype="float32")
        params, static, y0 = jax_problem(small)
        dtype = "float32"
        counter = neuralode.measure.EvaluationCounter()
        loss = loss_fn(
            c["strategy"], c["solver"], max(ns), static, dtype, counter=counter
        )
        fn = grad_fn(loss) if gradient else jax.jit(loss)
        counts = {}
        for n in ns:
            counter.reset()
            jax.block_until_ready(fn(params, y0, jnp.asarray(T1 / n, dtype)))
            counts[n] = counter.count
        if not gradient:
            return counts
        return self._primal_count(c["solver"], ns), counts

    def prepare(self, c) -> dict:
        """Every field of one row except `time_ms` and `peak_bytes`; the compiled
        gradient and its inputs are kept under `"timed"` for `time_ms`."""
        import neuralode.measure

        g, params, y0 = config_gradient(c)
        start = time.perf_counter()
        compiled = g.lower(params, y0).compile()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        grads = flat_grads(compiled(params, y0))
        run_s = time.perf_counter() - start
        nfe_forward, nfe_backward = self.nfe(c)
        return dict(
            xla_temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes),
            compile_s=compile_s,
            grad_rel_error=neuralode.measure.relative_error(
                grads, self.exact_reference(c)
            ),
            grad_rel_error_continuous=neuralode.measure.relative_error(
                grads, self.continuous_reference(c)
            ),
            nfe_forward=nfe_forward,
            nfe_backward=nfe_backward,
            stages=stages(c["solver"]),
            state_bytes=c["batch"] * c["state_dim"] * np.dtype(c["dtype"]).itemsize,
            timed=(compiled, params, y0),
            run_s=run_s,
        )

    def time_ms(self, prepared: dict) -> float:
        """Median time of the prepared gradient (run with nothing else in flight)."""
        import neuralode.measure

        return neuralode.measure.median_time_ms(
            *prepared["timed"], repeats=self.repeats
        )

    def tolerance_rows(self, sizes, strategy, dtype):
        """Gradient error against the converged solve, adaptive Tsit5, rtol = atol = tol,
        for one strategy and dtype (one compile: the tolerance is a traced input)."""
        import jax.numpy as jnp

        import neuralode.measure

        c = dict(plan(sizes)[0], strategy=strategy, dtype=dtype)
        params, static, y0 = jax_problem(c)
        loss = loss_fn(
            strategy,
            "tsit5",
            None,
            static,
            dtype,
            tol=True,
            max_steps=4096,
            t1=T1_TOLERANCE,
        )
        g = grad_fn(loss)
        ref = self.continuous_reference(c, T1_TOLERANCE)
        rows = []
        for tol in sizes["tols"]:
            grads = flat_grads(g(params, y0, jnp.asarray(tol, dtype)))
            finite = all(np.all(np.isfinite(x)) for x in grads)
            rows.append(
                dict(
                    strategy=strategy,
                    dtype=dtype,
                    solver="tsit5",
                    tol=tol,
                    depth=c["depth"],
                    width=c["width"],
                    batch=c["batch"],
                    state_dim=c["state_dim"],
                    grad_rel_error_continuous=(
                        neuralode.measure.relative_error(grads, ref) if finite else None
                    ),
                )
            )
        return rows


def _network_key(c: dict) -> tuple:
    return (c["depth"], c["width"], c["batch"], c["state_dim"])


# ---------------------------------------------------------------------------------------
# Worker processes: device peak (one configuration per process) and torchdiffeq.


def peak_worker(c: dict) -> dict:
    """Run one configuration once in this fresh process and return its device peak
    minus the peak once the inputs were placed."""
    import neuralode.measure

    jax = _jax()
    g, params, y0 = config_gradient(c)
    jax.block_until_ready((params, y0))
    baseline = neuralode.measure.peak_memory_bytes()
    jax.block_until_ready(g(params, y0))
    peak = neuralode.measure.peak_memory_bytes()
    return dict(peak_bytes=None if peak is None else peak - baseline)


def torch_worker(configs: list[dict], repeats: int, deadline: float) -> list[dict]:
    """torchdiffeq's `odeint` and `odeint_adjoint` (rk4 on the same fixed grid) on the
    same problem. Errors against a float64 torch `odeint` of the same grid; gradients
    are returned so that the caller compares them with the converged JAX reference."""
    import torch
    import torchdiffeq

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = []

    class Field(torch.nn.Module):
        def __init__(self, layers, dtype):
            super().__init__()
            self.linears = torch.nn.ModuleList()
            for w, b in layers:
                lin = torch.nn.Linear(w.shape[1], w.shape[0])
                with torch.no_grad():
                    lin.weight.copy_(torch.as_tensor(w))
                    lin.bias.copy_(torch.as_tensor(b))
                self.linears.append(lin)
            self.to(device=device, dtype=dtype)
            self.calls = 0

        def forward(self, t, y):
            self.calls += 1
            for lin in self.linears[:-1]:
                y = torch.tanh(lin(y))
            return self.linears[-1](y)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def gradient(c, strategy, dtype):
        layers, y0_np = numpy_problem(c)
        field = Field(layers, dtype)
        y0 = torch.as_tensor(y0_np, dtype=dtype, device=device).requires_grad_(True)
        ts = torch.tensor([0.0, T1], dtype=dtype, device=device)
        solve = (
            torchdiffeq.odeint_adjoint
            if strategy == "torch_odeint_adjoint"
            else (torchdiffeq.odeint)
        )
        options = dict(step_size=T1 / c["n_steps"])

        def run():
            for p in list(field.parameters()) + [y0]:
                p.grad = None
            ys = solve(field, y0, ts, method="rk4", options=options)
            loss = 0.5 * (ys[-1] ** 2).mean()
            loss.backward()
            sync()
            return [
                p.grad.detach().cpu().double().numpy()
                for p in list(field.parameters()) + [y0]
            ]

        return field, y0, ts, solve, options, run

    refs = {}
    for c in configs:
        if time.perf_counter() > deadline:
            break
        key = c["n_steps"]
        if key not in refs:
            refs[key] = gradient(c, "torch_odeint", torch.float64)[-1]()
        field, y0, ts, solve, options, run = gradient(c, c["strategy"], torch.float32)
        with torch.no_grad():
            field.calls = 0
            solve(field, y0, ts, method="rk4", options=options)
            nfe_forward = field.calls
        field.calls = 0
        grads = run()
        nfe_backward = field.calls - nfe_forward
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
        peak = None
        if device == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
            run()
            peak = int(torch.cuda.max_memory_allocated() - baseline)
        num = sum(
            float(np.sum((a - b) ** 2)) for a, b in zip(grads, refs[key], strict=False)
        )
        den = sum(float(np.sum(b**2)) for b in refs[key])
        out.append(
            dict(
                c,
                solver="rk4",
                peak_bytes=peak,
                time_ms=float(np.median(times)),
                grad_rel_error=float(np.sqrt(num / den)),
                nfe_forward=nfe_forward,
                nfe_backward=nfe_backward,
                stages=4,
                xla_temp_bytes=None,
                grads=[g.tolist() for g in grads],
                torch=torch.__version__,
                torchdiffeq=torchdiffeq.__version__,
            )
        )
    return out


def _run_worker(kind: str, payload: dict, env: dict, timeout: float, script=__file__):
    """Run `script --{kind}-worker PAYLOAD` in a fresh process: (result, error)."""
    try:
        proc = subprocess.run(
            [
                sys.executable,
                os.path.abspath(script),
                f"--{kind}-worker",
                json.dumps(payload),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=max(timeout, 1),
        )
    except subprocess.TimeoutExpired:
        return None, "timeout"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        # The exception's own line, not JAX's note on filtered traceback frames.
        err = proc.stderr.strip().splitlines() or ["no output"]
        return None, next((x for x in err[::-1] if "Error" in x), err[-1])[:300]
    return json.loads(lines[-1][len("RESULT ") :]), None


def _env(**changes) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(changes)
    return env


def probe_backend() -> str:
    proc = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.default_backend())"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else "unknown"


def peak_pool_fraction(workers: int) -> float:
    """Share of the device each peak process preallocates (60% for all of them)."""
    return round(min(0.5, 0.6 / workers), 3)


def measure_peaks(configs, deadline, workers) -> tuple[dict, list]:
    """Device peak of each configuration, one fresh process each, `workers` at a time
    (each process's allocator counts only its own buffers).

    Each process preallocates its pool: XLA's BFC allocator counts whole chunks as in
    use, and a chunk under twice the request is not split; growing on demand, its
    regions double in size, so a buffer could count as its whole region, up to the
    next power of two. Carved from one preallocated region, every chunk is split to the
    request."""
    env = _env(
        XLA_PYTHON_CLIENT_PREALLOCATE="true",
        XLA_PYTHON_CLIENT_MEM_FRACTION=str(peak_pool_fraction(workers)),
        XLA_FLAGS="--xla_gpu_autotune_level=0",
    )
    peaks, failures = {}, []

    def one(c):
        left = deadline - time.perf_counter()
        if left < 5:
            return c, None, "time budget"
        result, error = _run_worker("peak", c, env, left)
        return c, result, error

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for c, result, error in pool.map(one, configs):
            if result is not None:
                peaks[config_key(c)] = result
            else:
                failures.append(f"peak {config_key(c)}: {error}")
    return peaks, failures


# ---------------------------------------------------------------------------------------
# Analysis and output.


def exponents(rows: list[dict]) -> list[dict]:
    """Growth exponents of memory in n, m and d per strategy (log-log least squares over
    the float32 sweep rows), and the memory added per step in units of one state."""
    import neuralode.measure

    table = []
    strategies = sorted(
        {r["strategy"] for r in rows}, key=lambda s: (CORE + PEERS + TORCH).index(s)
    )
    for strategy in strategies:
        entry = dict(strategy=strategy)
        for sweep, var in (("n", "n_steps"), ("m", "depth"), ("d", "width")):
            sel = [
                r
                for r in rows
                if r["strategy"] == strategy
                and r["sweep"] == sweep
                and r["dtype"] == "float32"
            ]
            for metric in ("xla_temp_bytes", "peak_bytes"):
                pts = [(r[var], r[metric]) for r in sel if r.get(metric) is not None]
                entry[f"{metric}_exp_{sweep}"] = (
                    neuralode.measure.fit_exponent(*zip(*pts, strict=False))
                    if len(pts) >= 2
                    else None
                )
                if sweep == "n":
                    state = sel[0]["state_bytes"] if sel else None
                    entry[f"{metric}_states_per_step"] = (
                        neuralode.measure.fit_increment(*zip(*pts, strict=False))
                        / state
                        if len(pts) >= 2 and state
                        else None
                    )
        promised = PROMISED.get(strategy)
        entry["promised"] = promised[0] if promised else None
        entry["promised_exp"] = list(promised[1:]) if promised else None
        table.append(entry)
    return table


def checks(rows: list[dict]) -> list[dict]:
    """The properties the report must show, evaluated on its own rows."""
    out = []

    def get(strategy, **match):
        return [
            r
            for r in rows
            if r["strategy"] == strategy
            and r.get("grad_rel_error") is not None
            and all(r[k] == v for k, v in match.items())
        ]

    f32 = [
        (s, b)
        for s in get("symplectic", dtype="float32")
        for b in get("backprop", dtype="float32")
        if config_key(dict(s, strategy="")) == config_key(dict(b, strategy=""))
    ]
    if f32:
        worst_s = max(s["grad_rel_error"] for s, _ in f32)
        worst_b = max(b["grad_rel_error"] for _, b in f32)
        ratio, at = max(
            (
                (s["grad_rel_error"] / max(b["grad_rel_error"], 1e-30), s)
                for s, b in f32
            ),
            key=lambda pair: pair[0],
        )
        out.append(
            dict(
                name="float32: symplectic error at backprop's rounding level",
                value=f"max symplectic {worst_s:.2e}, max backprop {worst_b:.2e}, "
                f"worst ratio {ratio:.2f} ({at['solver']}, n={at['n_steps']}, depth "
                f"{at['depth']}, width {at['width']}) over {len(f32)} configurations",
                passed=bool(ratio < 10),
            )
        )
    f64 = get("symplectic", dtype="float64")
    if f64:
        worst = max(r["grad_rel_error"] for r in f64)
        out.append(
            dict(
                name="float64: symplectic error ≤ 1e-12",
                value=f"max {worst:.2e} over {len(f64)} solvers",
                passed=bool(worst <= 1e-12),
            )
        )
    nrows = [r for r in rows if r["sweep"] == "n" and r["dtype"] == "float32"]
    if nrows:
        n_max = max(r["n_steps"] for r in nrows)
        for metric in ("xla_temp_bytes", "peak_bytes"):
            at = {
                r["strategy"]: r[metric]
                for r in nrows
                if r["n_steps"] == n_max and r.get(metric) is not None
            }
            if all(s in at for s in CORE):
                b, s, c = at["backprop"], at["symplectic"], at["continuous"]
                out.append(
                    dict(
                        name=f"{metric} at n={n_max}: backprop ≫ symplectic > continuous",
                        value=f"{b / 2**20:.3f} MiB ≫ {s / 2**20:.3f} MiB > "
                        f"{c / 2**20:.3f} MiB (backprop/symplectic = {b / s:.1f}×)",
                        passed=bool(b > 10 * s and s > c),
                    )
                )
    return out


def device_kind_slug(kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "device"


def fmt_bytes(b):
    if b is None:
        return "–"
    return f"{b / 2**20:.3f}" if b < 2**30 else f"{b / 2**20:.0f}"


def fmt(x, spec):
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return format(x, spec) if not isinstance(x, str) else x


def peak_pool_note(results: dict) -> str:
    if results.get("backend") != "gpu":
        return ""
    if results.get("peak_pool"):
        return f"; allocator pool {results['peak_pool']}"
    # Older results, measured with the pool growing on demand (see `measure_peaks`).
    return (
        "; measured with the allocator growing on demand, so a buffer can count as the "
        "whole region grown for it, up to the next power of two, and `states/step (peak)` "
        "is not a per-step figure: read `xla` for growth"
    )


def write_markdown(results: dict, out_dir: str) -> str:
    rows = results["rows"]
    lines = [
        f"# neuralode benchmarks — {results['device']}",
        "",
        f"Command: `{results['command']}`  ",
        f"Device: {results['device']} ({results['backend']}); jax {results['jax']}, "
        f"diffrax {results['diffrax']}, equinox {results['equinox']}, "
        f"Python {results['python']}"
        + (
            f", torch {results['torch']}, torchdiffeq {results['torchdiffeq']}"
            if results.get("torch")
            else ", torchdiffeq not installed"
        )
        + "  ",
        f"Mode: {results['mode']}; wall time {results['wall_s']:.0f} s; float32 matrix "
        f"products at precision `{results.get('matmul_precision', 'default')}`. Every "
        "figure below is read from `results.json` in this folder.",
        "",
        "Problem: dy/dt = MLP(y) (tanh), t ∈ [0, 1], constant steps 1/n, loss ½·mean(y(1)²), "
        "gradient w.r.t. the MLP's parameters and y0. Memory in MiB: `xla` = XLA's static "
        "temporary buffers of the compiled gradient; `peak` = device peak minus the peak "
        "with the inputs placed, one process per configuration (GPU only"
        + peak_pool_note(results)
        + "). `err` = relative error against float64 backprop of the same "
        "discretisation; `err∞` = against a float64 Dopri8 solve at tol 1e-12.",
        "",
        "Strategies: "
        + "; ".join(
            f"`{k}` = {v}"
            for k, v in DESCRIPTION.items()
            if any(r["strategy"] == k for r in rows)
        )
        + ".",
        "",
    ]
    if results.get("skipped"):
        lines += [
            f"Not measured ({len(results['skipped'])}): "
            + "; ".join(results["skipped"][:10]),
            "",
        ]

    lines += ["## Checks", "", "| check | measured | holds |", "|---|---|---|"]
    for ch in results["checks"]:
        lines.append(
            f"| {ch['name']} | {ch['value']} | {'yes' if ch['passed'] else 'NO'} |"
        )
    if results.get("backend") == "gpu":
        lines += [
            "",
            "On a GPU the float32 errors include XLA's choice of matrix-product kernels "
            "(its GEMM autotuner); `python benchmarks/xla_flags.py` separates that from "
            "a strategy's own error (see benchmarks/README.md).",
        ]

    lines += [
        "",
        "## Memory growth exponents (the measured Table 1)",
        "",
        "Least-squares slope of log(memory) against log(n), log(m), log(d); "
        "`states/step` = memory added per step in units of one state "
        "(batch × state_dim × itemsize).",
        "",
        "| strategy | promised | exp n (xla) | exp m (xla) | exp d (xla) | "
        "states/step (xla) | exp n (peak) | states/step (peak) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in results["exponents"]:
        promised = (
            f"{e['promised']}: n^{e['promised_exp'][0]} m^{e['promised_exp'][1]} "
            f"d^{e['promised_exp'][2]}"
            if e["promised"]
            else "–"
        )
        lines.append(
            f"| {e['strategy']} | {promised} | {fmt(e['xla_temp_bytes_exp_n'], '.2f')} | "
            f"{fmt(e['xla_temp_bytes_exp_m'], '.2f')} | {fmt(e['xla_temp_bytes_exp_d'], '.2f')}"
            f" | {fmt(e['xla_temp_bytes_states_per_step'], '.2f')} | "
            f"{fmt(e['peak_bytes_exp_n'], '.2f')} | "
            f"{fmt(e['peak_bytes_states_per_step'], '.2f')} |"
        )

    def table(title, sweep, var):
        sel = [r for r in rows if r["sweep"] == sweep]
        if not sel:
            return
        second = "stages" if var == "solver" else "solver"
        lines.extend(
            [
                "",
                f"## {title}",
                "",
                f"| strategy | {var} | {second} | xla MiB | peak MiB | time ms | err | "
                "err∞ | nfe fwd | nfe bwd |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
        )
        for r in sel:
            lines.append(
                f"| {r['strategy']} | {r[var]} | {r[second]} | "
                f"{fmt_bytes(r.get('xla_temp_bytes'))} | {fmt_bytes(r.get('peak_bytes'))} | "
                f"{fmt(r.get('time_ms'), '.2f')} | {fmt(r.get('grad_rel_error'), '.1e')} | "
                f"{fmt(r.get('grad_rel_error_continuous'), '.1e')} | "
                f"{fmt(r.get('nfe_forward'), 'd')} | {fmt(r.get('nfe_backward'), 'd')} |"
            )

    b = rows[0] if rows else {}
    fixed = (
        f"depth {b.get('depth')}, width {b.get('width')}, batch {b.get('batch')}, "
        f"state_dim {b.get('state_dim')}, float32"
    )
    lines += [
        "",
        "## Plots",
        "",
        "![memory vs n](memory_vs_n.png) ![time vs n](time_vs_n.png) "
        "![error vs tolerance](error_vs_tol.png)",
    ]
    table(f"Steps n ({fixed}, solver {results['sizes']['solver']})", "n", "n_steps")
    table(f"Stages s (n = {results['sizes']['n_base']})", "s", "solver")
    table(f"Depth m (n = {results['sizes']['n_base']})", "m", "depth")
    table(f"Width d (n = {results['sizes']['n_base']})", "d", "width")
    table(
        "float64 runs (n = {}, every solver)".format(results["sizes"]["n_base"]),
        "float64",
        "solver",
    )

    tol_rows = results.get("tolerance_rows", [])
    if tol_rows:
        tols = sorted({r["tol"] for r in tol_rows}, reverse=True)
        lines += [
            "",
            "## Gradient error vs tolerance (adaptive Tsit5, rtol = atol = tol, "
            f"t ∈ [0, {T1_TOLERANCE:g}]; error against the converged solve)",
            "",
            "| strategy | dtype | " + " | ".join(f"{t:.0e}" for t in tols) + " |",
            "|---|---|" + "---|" * len(tols),
        ]
        for strategy in ("continuous", "symplectic"):
            for dtype in ("float64", "float32"):
                got = {
                    r["tol"]: r["grad_rel_error_continuous"]
                    for r in tol_rows
                    if r["strategy"] == strategy and r["dtype"] == dtype
                }
                if got:
                    lines.append(
                        f"| {strategy} | {dtype} | "
                        + " | ".join(fmt(got.get(t), ".1e") for t in tols)
                        + " |"
                    )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    return text


def plot(results: dict, out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["sweep"] == "n"]
    strategies = [
        s for s in CORE + PEERS + TORCH if any(r["strategy"] == s for r in rows)
    ]
    for name, metric, ylabel in (
        ("memory_vs_n", "xla_temp_bytes", "memory (MiB)"),
        ("time_vs_n", "time_ms", "time per gradient (ms)"),
    ):
        fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=80)
        for i, s in enumerate(strategies):
            color = f"C{i}"
            for m, style in ((metric, "o-"), ("peak_bytes", "s--")):
                if name == "time_vs_n" and m == "peak_bytes":
                    continue
                pts = sorted(
                    (r["n_steps"], r[m])
                    for r in rows
                    if r["strategy"] == s and r.get(m) is not None
                )
                if not pts:
                    continue
                xs, ys = zip(*pts, strict=False)
                ys = [y / 2**20 for y in ys] if m != "time_ms" else ys
                label = s if m != "peak_bytes" else f"{s} (peak)"
                ax.plot(xs, ys, style, color=color, label=label, ms=3, lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("steps n")
        ax.set_ylabel(ylabel)
        ax.set_title(
            f"{results['device']}"
            + (": XLA temp (solid), peak (dashed)" if name == "memory_vs_n" else ""),
            fontsize=9,
        )
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{name}.png"))
        plt.close(fig)

    tol_rows = results.get("tolerance_rows", [])
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=80)
    for i, strategy in enumerate(("continuous", "symplectic")):
        for dtype, style in (("float64", "o-"), ("float32", "s--")):
            pts = sorted(
                (r["tol"], r["grad_rel_error_continuous"])
                for r in tol_rows
                if r["strategy"] == strategy
                and r["dtype"] == dtype
                and r["grad_rel_error_continuous"] is not None
            )
            if pts:
                ax.plot(
                    *zip(*pts, strict=False),
                    style,
                    color=f"C{i}",
                    label=f"{strategy} {dtype}",
                    ms=3,
                    lw=1,
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("rtol = atol")
    ax.set_ylabel("gradient error vs converged solve")
    ax.set_title(f"{results['device']}: adaptive Tsit5", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "error_vs_tol.png"))
    plt.close(fig)


def command_line(argv) -> str:
    return " ".join(["python", "benchmarks/report.py"] + list(argv))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes: under 5 minutes on 2 CPU cores",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default benchmarks/results/<device-kind>/)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-time budget; configurations past it are skipped",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="configurations compiled side by side (default: half the CPU cores, 2-8)",
    )
    parser.add_argument(
        "--peak-workers",
        type=int,
        default=None,
        help="GPU: peak-measuring processes at a time (default: half the CPU cores, ≤8)",
    )
    parser.add_argument(
        "--render",
        metavar="DIR",
        help="only rewrite DIR/results.md, the plots and the checks in DIR/results.json "
        "from the rows of DIR/results.json",
    )
    parser.add_argument("--peak-worker", help=argparse.SUPPRESS)
    parser.add_argument("--torch-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.peak_worker:
        print("RESULT " + json.dumps(peak_worker(json.loads(args.peak_worker))))
        return
    if args.torch_worker:
        p = json.loads(args.torch_worker)
        rows = torch_worker(
            p["configs"], p["repeats"], time.perf_counter() + p["budget_s"]
        )
        print("RESULT " + json.dumps(rows))
        return

    if args.render:
        with open(os.path.join(args.render, "results.json")) as f:
            results = json.load(f)
        results["checks"] = checks(results["rows"])  # derived from the rows alone
        with open(os.path.join(args.render, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=float)
        plot(results, args.render)
        print(write_markdown(results, args.render).split("## Plots")[0])
        return

    start = time.perf_counter()
    mode = "quick" if args.quick else "full"
    budget = args.budget_s or SIZES[mode]["budget_s"]
    sizes = dict(SIZES[mode], budget_s=budget)  # results.json records the budget used
    deadline = start + budget
    configs = plan(sizes)
    first = {}
    for c in configs:
        first.setdefault(config_key(c), c)
    unique = list(first.values())
    cpus = os.cpu_count() or 2
    skipped = []

    def elapsed():
        return f"[{time.perf_counter() - start:6.1f}s]"

    backend = probe_backend()
    if backend == "gpu":
        # Peak workers run beside this process: none may take the GPU's memory up front.
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    jax = _jax()
    import diffrax
    import equinox

    import neuralode.measure

    measurer = Measurer(sizes["repeats"], configs)
    with_torch = bool(
        importlib.util.find_spec("torch") and importlib.util.find_spec("torchdiffeq")
    )
    # Pass 1, several tasks at a time (compiling is most of the work), while fresh
    # processes measure device peaks: everything but the timings. Tasks start in plan
    # order, the tolerance sweep after the n and float64 rows. A task starts only while
    # the budget still holds the timings of what is prepared (estimated from each first
    # run), torchdiffeq's share, and a reserve for tasks in flight and the output.
    reserve = (0.05 + 0.15 * with_torch) * budget
    timing_s, lock = [0.0], threading.Lock()

    def timing_estimate():
        # Pass-1 runs share the device with other threads and the peak workers, which
        # inflates them many times over on a GPU: cap the estimate at a share of the
        # budget (the timing loop stops at the deadline in any case).
        return min(1.5 * (sizes["repeats"] + 1) * timing_s[0], 0.15 * budget)

    def run_task(kind, item):
        if time.perf_counter() + reserve + timing_estimate() > deadline:
            return None, "time budget"
        try:
            if kind == "tolerance":
                return measurer.tolerance_rows(sizes, *item), None
            result = measurer.prepare(item)
        except Exception as e:  # one failing configuration must not end the report
            return None, f"{type(e).__name__}: {str(e)[:200]}"
        with lock:
            timing_s[0] += result["run_s"]
        print(
            f"{elapsed()} {item['sweep']:7s} {item['strategy']:18s} {item['solver']:6s}"
            f" n={item['n_steps']:<5d} m={item['depth']} d={item['width']:<4d}"
            f" {item['dtype']}  xla={result['xla_temp_bytes'] / 2**20:9.3f} MiB"
            f"  err={result['grad_rel_error']:.1e}",
            flush=True,
        )
        return result, None

    split = next(
        (i for i, c in enumerate(unique) if c["sweep"] not in ("n", "float64")),
        len(unique),
    )
    tasks = (
        [("row", c) for c in unique[:split]]
        + [("tolerance", (s, d)) for d in ("float64", "float32") for s in TOLERANCE]
        + [("row", c) for c in unique[split:]]
    )
    threads = args.threads or max(2, min(8, cpus // 2))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(run_task, *task) for task in tasks]
        peaks = {}
        peak_pool = None
        if backend == "gpu":
            workers = args.peak_workers or max(1, min(8, cpus // 2))
            peak_pool = f"preallocated, fraction {peak_pool_fraction(workers)}"
            peaks, failures = measure_peaks(unique, start + 0.5 * budget, workers)
            skipped += failures
        prepared, tolerance_rows = {}, []
        for (kind, item), future in zip(tasks, futures, strict=True):
            result, error = future.result()
            if kind == "tolerance":
                tolerance_rows += result or []
                if error:
                    skipped.append(f"tolerance {item}: {error}")
            elif result is not None:
                prepared[config_key(item)] = result
            else:
                skipped.append(f"{item['sweep']}:{config_key(item)}: {error}")

    # torchdiffeq in its own process, then the JAX timings here, each with the device
    # to itself.
    torch_rows, versions = [], {}
    if with_torch:
        base = [c for c in configs if c["sweep"] == "n" and c["strategy"] == "backprop"]
        tconfigs = [dict(c, strategy=s) for c in base for s in TORCH]
        left = deadline - time.perf_counter() - 0.03 * budget - timing_estimate()
        result, error = _run_worker(
            "torch",
            dict(configs=tconfigs, repeats=sizes["repeats"], budget_s=left),
            _env(JAX_PLATFORMS="cpu"),
            left + 60,
        )
        if result is None:
            skipped.append(f"torchdiffeq: {error}")
        else:
            torch_rows = result
            if result:
                versions = dict(
                    torch=result[0]["torch"], torchdiffeq=result[0]["torchdiffeq"]
                )

    for key, result in prepared.items():
        if time.perf_counter() > deadline - 0.02 * budget:
            skipped.append(f"timing {key} (time budget)")
        else:
            result["time_ms"] = measurer.time_ms(result)
            print(f"{elapsed()} time {key}: {result['time_ms']:.2f} ms", flush=True)
        del result["timed"], result["run_s"]

    rows = []
    for c in configs:
        key = config_key(c)
        if key in prepared:
            peak = (peaks.get(key) or {}).get("peak_bytes")
            rows.append(dict(c, time_ms=None, peak_bytes=peak) | prepared[key])
    for r in torch_rows:
        ref = measurer.continuous_reference(r)
        r["grad_rel_error_continuous"] = neuralode.measure.relative_error(
            [np.asarray(g) for g in r.pop("grads")], ref
        )
        r.pop("torch", None)
        r.pop("torchdiffeq", None)
        r["state_bytes"] = r["batch"] * r["state_dim"] * 4
        rows.append(r)

    device = jax.devices()[0]
    kind = "cpu" if device.platform == "cpu" else device.device_kind
    out_dir = args.out or os.path.join(HERE, "results", device_kind_slug(kind))
    os.makedirs(out_dir, exist_ok=True)
    results = dict(
        device=kind
        if device.platform != "cpu"
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        backend=device.platform,
        jax=jax.__version__,
        diffrax=diffrax.__version__,
        equinox=equinox.__version__,
        python=platform.python_version(),
        **versions,
        command=command_line(argv),
        mode=mode,
        matmul_precision=MATMUL_PRECISION,
        peak_pool=peak_pool,
        threads=threads,
        sizes=sizes,
        rows=rows,
        tolerance_rows=tolerance_rows,
        skipped=skipped,
    )
    results["exponents"] = exponents(
        [
            r
            for r in rows
            if r.get("xla_temp_bytes") is not None or r.get("peak_bytes") is not None
        ]
    )
    results["checks"] = checks(rows)
    results["wall_s"] = time.perf_counter() - start
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    plot(results, out_dir)
    text = write_markdown(results, out_dir)
    # The tables a person reads first: checks and exponents.
    print(text.split("## Steps n")[0])
    print(f"wrote {out_dir} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
