"""Measuring JAX configurations in this process: `prepare` compiles a configuration and
measures everything but its time (XLA's memory figure, gradient errors, evaluations of
f; thread-safe, so that configurations compile side by side), `time_groups` then times
the prepared gradients of each problem interleaved with its forward solve."""

import concurrent.futures
import threading
import time

import numpy as np

from reporting import timing
from reporting.problems import (
    MATMUL_PRECISION,
    T1,
    T1_TOLERANCE,
    config_key,
    group_key,
    network_key,
)
from reporting.solve import (
    config_forward,
    config_gradient,
    config_loss,
    flat_grads,
    grad_fn,
    jax_problem,
    loss_fn,
    setup_jax,
    stages,
)
from reporting.strategies import schedule_depends_on_max_steps


class Measurer:
    """References and evaluation counts shared between configurations are computed
    once, by the first thread that asks."""

    def __init__(self, configs: list[dict]):
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
        """float64 full backprop of the same discretisation; of an adaptive solve,
        float64 `RecursiveCheckpointAdjoint()` (as exact, and backprop would keep a
        state for each of `max_steps`), on the steps the float64 solve chooses."""

        def make():
            strategy = "backprop" if c.get("tol") is None else "diffrax_rca"
            reference = dict(
                c, strategy=strategy, dtype="float64", precision=MATMUL_PRECISION
            )
            g, params, y0 = config_gradient(reference)
            return flat_grads(g(params, y0))

        key = ("exact", c["solver"], c["n_steps"], c.get("tol")) + network_key(c)
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

        return self._once(("continuous", t1) + network_key(c), make)

    def nfe(self, c):
        """(forward, backward) evaluations of f, counted at run time on a small network
        (the count depends on the strategy, solver and n only). One compile serves every
        n of the plan where the schedule does not depend on `max_steps` (dt0 is an
        input, `max_steps` the largest n); checkpointing schedules get one per n.
        An adaptive solve is counted on its own network, whose field sets the steps."""
        if c.get("tol") is not None:
            return self._once(("nfe",) + config_key(c), lambda: self._count_adaptive(c))
        ns = {c["n_steps"]}
        if not schedule_depends_on_max_steps(c["strategy"]):
            ns |= {
                p["n_steps"]
                for p in self.configs
                if (p["strategy"], p["solver"]) == (c["strategy"], c["solver"])
                and p.get("tol") is None
            }
        ns = tuple(sorted(ns))
        key = ("nfe", c["strategy"], c["solver"], ns)
        fwd, total = self._once(key, lambda: self._count(c, ns))
        n = c["n_steps"]
        return fwd[n], total[n] - fwd[n]

    def _primal_count(self, solver, ns):
        """Evaluations of f in the primal solve: the same loop for every strategy, so
        one compile serves every n of the plan with this solver."""
        planned = {
            p["n_steps"]
            for p in self.configs
            if p["solver"] == solver and p.get("tol") is None
        }
        ns = tuple(sorted(planned)) if set(ns) <= planned else ns
        c = dict(strategy="diffrax_rca_n", solver=solver)
        return self._once(("primal", solver, ns), lambda: self._count(c, ns, False))

    def _count(self, c, ns, gradient=True):
        """({n: evaluations in the primal solve}, {n: evaluations in the gradient}),
        with max(ns) as `max_steps` and dt0 = 1/n an input."""
        import jax.numpy as jnp

        import neuralode.measure

        jax = setup_jax()
        small = dict(c, depth=1, width=4, batch=2, state_dim=2, dtype="float32")
        params, static, y0 = jax_problem(small)
        counter = neuralode.measure.EvaluationCounter()
        loss = loss_fn(
            c["strategy"], c["solver"], max(ns), static, "float32", counter=counter
        )
        fn = grad_fn(loss) if gradient else jax.jit(loss)
        counts = {}
        for n in ns:
            counter.reset()
            jax.block_until_ready(fn(params, y0, jnp.asarray(T1 / n, jnp.float32)))
            counts[n] = counter.count
        if not gradient:
            return counts
        return self._primal_count(c["solver"], ns), counts

    def _count_adaptive(self, c):
        """(forward, backward) evaluations of f in configuration `c`'s adaptive solve:
        the primal solve's (shared by the problem's strategies), and the gradient's
        beyond them."""
        jax = setup_jax()

        def count(strategy, gradient):
            import neuralode.measure

            params, static, y0 = jax_problem(c)
            counter = neuralode.measure.EvaluationCounter()
            loss = config_loss(c, static, strategy, counter=counter)
            fn = grad_fn(loss) if gradient else jax.jit(loss)
            jax.block_until_ready(fn(params, y0))
            return counter.count

        primal = self._once(
            ("primal",) + group_key(c), lambda: count("diffrax_rca", False)
        )
        return primal, count(c["strategy"], True) - primal

    def prepare(self, c) -> dict:
        """Every field of one row except the times and `peak_bytes`; the compiled
        gradient and its inputs are kept under `"timed"` for `time_groups`."""
        import neuralode.measure

        g, params, y0 = config_gradient(c)
        start = time.perf_counter()
        compiled = g.lower(params, y0).compile()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        grads = flat_grads(compiled(params, y0))
        run_s = time.perf_counter() - start
        nfe_forward, nfe_backward = self.nfe(c)
        error = neuralode.measure.relative_error
        return dict(
            xla_temp_bytes=neuralode.measure.compiled_temp_bytes(compiled),
            compile_s=compile_s,
            grad_rel_error=error(grads, self.exact_reference(c)),
            grad_rel_error_continuous=error(grads, self.continuous_reference(c)),
            nfe_forward=nfe_forward,
            nfe_backward=nfe_backward,
            stages=stages(c["solver"]),
            state_bytes=c["batch"] * c["state_dim"] * np.dtype(c["dtype"]).itemsize,
            timed=(compiled, params, y0),
            run_s=run_s,
        )

    def tolerance_rows(self, sizes, strategy, dtype):
        """Gradient error against the converged solve, adaptive Tsit5, rtol = atol = tol,
        for one strategy and dtype (one compile: the tolerance is a traced input)."""
        import jax.numpy as jnp

        import neuralode.measure

        c = dict(self.configs[0], strategy=strategy, dtype=dtype, solver="tsit5")
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
            error = neuralode.measure.relative_error(grads, ref) if finite else None
            rows.append(
                dict(
                    strategy=strategy,
                    dtype=dtype,
                    solver="tsit5",
                    tol=tol,
                    grad_rel_error_continuous=error,
                    **{k: c[k] for k in ("depth", "width", "batch", "state_dim")},
                )
            )
        return rows


def time_groups(prepared: dict, configs: list[dict], repeats: int, deadline, log):
    """Time every prepared configuration in place: the configurations of one problem
    (`group_key`) interleaved with its forward solve, `repeats` rounds. Groups that
    would pass `deadline` (estimated from each gradient's first run) are not timed:
    returns their skip entries."""
    groups = {}
    for c in configs:
        if config_key(c) in prepared:
            groups.setdefault(group_key(c), {})[config_key(c)] = c
    skipped = []
    for key, members in groups.items():
        cost = (repeats + 1) * sum(prepared[k]["run_s"] for k in members)
        if time.perf_counter() + cost > deadline:
            skipped += [f"timing {k}: time budget" for k in members]
            continue
        forward, params, y0 = config_forward(next(iter(members.values())))
        fns = {"forward": lambda p, y, f=forward: f(p, y)}
        fns.update({k: prepared[k]["timed"][0] for k in members})
        _, times = timing.time_interleaved(fns, (params, y0), repeats)
        for k in members:
            prepared[k].update(timing.summary(times[k], times["forward"]))
            prepared[k]["forward_ms"] = float(np.median(times["forward"]))
        log(
            f"time {key}: "
            + ", ".join(f"{k[0]} {prepared[k]['time_ms']:.2f} ms" for k in members)
        )
    return skipped
