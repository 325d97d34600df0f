"""A whole report run, in phases that never share the device: (1) this process compiles
and measures everything but time, several configurations at a time in threads
(compiling is most of the work); (2) it times each problem's gradients interleaved with
its forward solve, alone; (3) torchdiffeq, in its own process; (4) on a GPU, device
peaks in fresh processes, one at a time. The plan is cut to the budget before it starts
(by its estimate, `budget.fit`) and a running phase stops at the budget's end; whatever
was planned and not measured is listed with its reason."""

import concurrent.futures
import importlib.util
import json
import os
import platform
import re
import time

import numpy as np

from reporting import analysis, budget, render, workers
from reporting.measure_jax import Measurer, time_groups
from reporting.problems import MATMUL_PRECISION, SIZES, config_key, plan
from reporting.strategies import TOLERANCE, TORCH

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Clock:
    def __init__(self, budget_s):
        self.start = time.perf_counter()
        self.deadline = self.start + budget_s

    def log(self, message):
        print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", flush=True)


def with_torch() -> bool:
    return bool(
        importlib.util.find_spec("torch") and importlib.util.find_spec("torchdiffeq")
    )


def make_plan(mode, budget_s, backend, threads):
    """(sizes, planned rows, distinct configurations to measure, skip entries of those
    cut to the budget), the plan printed with its estimate (recorded in `sizes`)."""
    sizes = dict(SIZES[mode], budget_s=budget_s)  # results.json records the budget
    configs = plan(sizes)
    first = {}
    for c in configs:  # a configuration in several sweeps is measured once
        first.setdefault(config_key(c), c)
    unique = list(first.values())
    skipped = []
    if not with_torch():
        skipped += [
            f"{_name(c)}: torch/torchdiffeq not installed"
            for c in unique
            if c["strategy"] in TORCH
        ]
        unique = [c for c in unique if c["strategy"] not in TORCH]
    kw = dict(backend=backend, threads=threads, repeats=sizes["repeats"])
    unique, cut = budget.fit(unique, budget_s, **kw)
    skipped += [
        f"{_name(c)}: not started, the plan's estimate is over the budget" for c in cut
    ]
    sizes["estimated_s"] = round(budget.estimate_s(unique, **kw))
    counts = {}
    for c in unique:
        counts[c["sweep"]] = counts.get(c["sweep"], 0) + 1
    print(
        f"plan ({mode}, {backend}): {len(unique)} configurations "
        + ", ".join(f"{k}: {v}" for k, v in counts.items())
        + f"; {len(cut)} cut; estimated {sizes['estimated_s']} s of a "
        f"{budget_s:.0f} s budget",
        flush=True,
    )
    return sizes, configs, unique, skipped


def _name(c) -> str:
    return f"{c['sweep']}:{config_key(c)}"


def prepare_all(measurer, unique, sizes, clock, threads, reserve_s):
    """Phase 1: (prepared by key, tolerance rows, skip entries). A task starts only while
    the budget still holds the timings of what is prepared and `reserve_s`."""
    timing_s = [0.0]

    def task(kind, item):
        left = clock.deadline - time.perf_counter()
        if left < reserve_s + (sizes["repeats"] + 2) * timing_s[0]:
            return None, "not started: time budget"
        try:
            if kind == "tolerance":
                return measurer.tolerance_rows(sizes, *item), None
            result = measurer.prepare(item)
        except Exception as e:  # one failing configuration must not end the report
            return None, f"{type(e).__name__}: {str(e)[:200]}"
        timing_s[0] += result["run_s"]
        clock.log(
            f"{_name(item)} xla={result['xla_temp_bytes'] / 2**20:.3f} MiB "
            f"err={result['grad_rel_error']:.1e}"
        )
        return result, None

    tasks = [("row", c) for c in unique if c["strategy"] not in TORCH]
    tasks[2 * len(tasks) // 5 : 2 * len(tasks) // 5] = [
        ("tolerance", (s, d)) for d in ("float64", "float32") for s in TOLERANCE
    ]
    prepared, tolerance_rows, skipped = {}, [], []
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(task, *t) for t in tasks]
        for (kind, item), future in zip(tasks, futures, strict=True):
            result, error = future.result()
            if kind == "tolerance":
                tolerance_rows += result or []
                skipped += [f"tolerance {item}: {error}"] if error else []
            elif result is not None:
                prepared[config_key(item)] = result
            else:
                skipped.append(f"{_name(item)}: {error}")
    return prepared, tolerance_rows, skipped


def run_torch(unique, sizes, deadline, measurer):
    """Phase 3: torchdiffeq's rows, errors against the JAX references of the same
    discretisation, and skip entries."""
    import neuralode.measure

    tconfigs = [c for c in unique if c["strategy"] in TORCH]
    if not tconfigs:
        return [], {}, []
    payload = dict(
        configs=tconfigs,
        repeats=sizes["repeats"],
        budget_s=deadline - time.perf_counter(),
    )
    result, error = workers.run_worker(
        "torch", payload, workers.worker_env(JAX_PLATFORMS="cpu"), deadline
    )
    if result is None:
        return [], {}, [f"{_name(c)}: torchdiffeq: {error}" for c in tconfigs]
    rows, skipped = [], []
    for r in result:
        if "skipped" in r:
            skipped.append(f"{_name(r)}: {r.pop('skipped')}")
            continue
        grads = [np.asarray(g) for g in r.pop("grads")]
        r["grad_rel_error"] = neuralode.measure.relative_error(
            grads, measurer.exact_reference(r)
        )
        r["grad_rel_error_continuous"] = neuralode.measure.relative_error(
            grads, measurer.continuous_reference(r)
        )
        r["state_bytes"] = r["batch"] * r["state_dim"] * 4
        rows.append(r)
    versions = {k: result[0][k] for k in ("torch", "torchdiffeq")} if result else {}
    for r in rows:
        r.pop("torch"), r.pop("torchdiffeq")
    return rows, versions, skipped


def assemble(configs, prepared, peaks, torch_rows):
    """One row per planned configuration that was measured, in plan order."""
    torch_by_key = {config_key(r): r for r in torch_rows}
    rows = []
    for c in configs:
        key = config_key(c)
        if key in prepared:
            measured = {
                k: v for k, v in prepared[key].items() if k not in ("timed", "run_s")
            }
            rows.append(dict(c, time_ms=None, peak_bytes=peaks.get(key)) | measured)
        elif key in torch_by_key:
            rows.append(dict(torch_by_key[key], sweep=c["sweep"]))
    return rows


def device_kind_slug(kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "device"


def environment(jax, mode, command, threads):
    import diffrax
    import equinox

    device = jax.devices()[0]
    cpu = device.platform == "cpu"
    return dict(
        device=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        if cpu
        else device.device_kind,
        backend=device.platform,
        slug="cpu" if cpu else device_kind_slug(device.device_kind),
        jax=jax.__version__,
        diffrax=diffrax.__version__,
        equinox=equinox.__version__,
        python=platform.python_version(),
        command=command,
        mode=mode,
        matmul_precision=MATMUL_PRECISION,
        timing="interleaved",
        threads=threads,
    )


def finish(results, out_dir):
    """Derived tables, results.json, the plots and results.md."""
    rows = results["rows"]
    results["exponents"] = analysis.exponents(
        [
            r
            for r in rows
            if r.get("xla_temp_bytes") is not None or r.get("peak_bytes") is not None
        ]
    )
    results["checks"] = analysis.checks(rows)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    render.plot(results, out_dir)
    return render.write_markdown(results, out_dir)


def run(mode, budget_s, out, threads, command):
    """The whole report: returns results.md's text."""
    clock = Clock(budget_s)
    backend = workers.probe_backend()
    if backend == "gpu":  # the peak processes need the device's memory
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    sizes, configs, unique, skipped = make_plan(mode, budget_s, backend, threads)
    from reporting.solve import setup_jax

    jax = setup_jax()
    measurer = Measurer([c for c in unique if c["strategy"] not in TORCH])
    # Kept for the later phases: torchdiffeq by its estimate (plus its process's
    # start), the GPU's peak processes, and a margin.
    torch_configs = [c for c in unique if c["strategy"] in TORCH]
    kw = dict(backend=backend, threads=threads, repeats=sizes["repeats"])
    torch_s = 10 + budget.estimate_s(torch_configs, **kw) if torch_configs else 0
    peaks_s = 0.15 * budget_s * (backend == "gpu")
    reserve = torch_s + peaks_s + 0.03 * budget_s
    prepared, tolerance_rows, failed = prepare_all(
        measurer, unique, sizes, clock, threads, reserve
    )
    skipped += failed
    timed = [c for c in unique if config_key(c) in prepared]
    skipped += time_groups(
        prepared, timed, sizes["repeats"], clock.deadline - reserve, clock.log
    )
    # torchdiffeq until the peaks' share of the budget (on a GPU), the peaks to the end.
    torch_rows, versions, failed = run_torch(
        unique, sizes, clock.deadline - peaks_s, measurer
    )
    skipped += failed
    peaks = {}
    if backend == "gpu":
        xla = {k: p["xla_temp_bytes"] for k, p in prepared.items()}
        peaks, failed = workers.measure_peaks(timed, xla, clock.deadline)
        skipped += failed
    results = environment(jax, mode, command, threads) | versions
    slug = results.pop("slug")
    out_dir = out or os.path.join(HERE, "results", slug)
    results.update(
        peak_pool=f"preallocated, fraction {workers.PEAK_POOL_FRACTION}, one process at a time"
        if backend == "gpu"
        else None,
        sizes=sizes,
        rows=assemble(configs, prepared, peaks, torch_rows),
        tolerance_rows=tolerance_rows,
        skipped=skipped,
        wall_s=time.perf_counter() - clock.start,
    )
    text = finish(results, out_dir)
    print(f"wrote {out_dir} in {time.perf_counter() - clock.start:.0f} s")
    return text
