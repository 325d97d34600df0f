"""What the rows show: memory growth exponents beside the promised orders, the checks
the report must pass, and the time–memory plane of exact gradients with its answer to
"at this memory, which exact gradient is fastest, and by how much over Diffrax's best"."""

from reporting.plane import pareto
from reporting.problems import MATMUL_PRECISION, group_key
from reporting.strategies import CORE, PROMISED, is_diffrax, is_exact, order


def exponents(rows: list[dict]) -> list[dict]:
    """Growth exponents of memory in n, m and d per strategy (log-log least squares over
    the float32 sweep rows), and the memory added per step in units of one state."""
    import neuralode.measure as measure

    table = []
    for strategy in sorted({r["strategy"] for r in rows}, key=order):
        entry = dict(strategy=strategy)
        for sweep, var in (("n", "n_steps"), ("m", "depth"), ("d", "width")):
            sel = [
                r
                for r in rows
                if (r["strategy"], r["sweep"], r["dtype"])
                == (strategy, sweep, "float32")
            ]
            for metric in ("xla_temp_bytes", "peak_bytes"):
                pts = [(r[var], r[metric]) for r in sel if r.get(metric) is not None]
                enough = len(pts) >= 2
                xs, ys = zip(*pts, strict=True) if enough else ((), ())
                entry[f"{metric}_exp_{sweep}"] = (
                    measure.fit_exponent(xs, ys) if enough else None
                )
                if sweep == "n":
                    state = sel[0]["state_bytes"] if sel else None
                    entry[f"{metric}_states_per_step"] = (
                        measure.fit_increment(xs, ys) / state
                        if enough and state
                        else None
                    )
        promised = PROMISED.get(strategy)
        entry["promised"] = promised[0] if promised else None
        entry["promised_exp"] = list(promised[1:]) if promised else None
        measured = [v for k, v in entry.items() if k != "strategy" and v is not None]
        if promised or measured:
            table.append(entry)
    return table


def checks(rows: list[dict]) -> list[dict]:
    """The properties the report must show, evaluated on its own rows."""
    return [
        c
        for c in (
            _check_float32(rows),
            _check_float64(rows),
            *_check_memory(rows),
            *_check_adaptive(rows),
        )
        if c is not None
    ]


def _with_error(rows, strategy, dtype):
    return [
        r
        for r in rows
        if (r["strategy"], r["dtype"]) == (strategy, dtype)
        and r.get("grad_rel_error") is not None
    ]


def _constant_highest(rows):
    """Each configuration once (a row can be in several sweeps), of the constant-step
    solves at full matmul precision: TF32 products or adaptive step choices would hide
    the rounding this compares."""
    return list(
        {
            group_key(r) + (r["strategy"],): r
            for r in rows
            if r.get("tol") is None
            and r.get("precision", MATMUL_PRECISION) == MATMUL_PRECISION
        }.values()
    )


def _check_float32(rows):
    rows = _constant_highest(rows)
    backprop = {group_key(b): b for b in _with_error(rows, "backprop", "float32")}
    pairs = [
        (s, backprop[group_key(s)])
        for s in _with_error(rows, "symplectic", "float32")
        if group_key(s) in backprop
    ]
    if not pairs:
        return None
    worst_s = max(s["grad_rel_error"] for s, _ in pairs)
    worst_b = max(b["grad_rel_error"] for _, b in pairs)
    ratio, at = max(
        ((s["grad_rel_error"] / max(b["grad_rel_error"], 1e-30), s) for s, b in pairs),
        key=lambda pair: pair[0],
    )
    return dict(
        name="float32: symplectic error at backprop's rounding level",
        value=f"max symplectic {worst_s:.2e}, max backprop {worst_b:.2e}, "
        f"worst ratio {ratio:.2f} ({at['solver']}, n={at['n_steps']}, depth "
        f"{at['depth']}, width {at['width']}) over {len(pairs)} configurations",
        passed=bool(ratio < 10),
    )


def _check_float64(rows):
    f64 = _with_error(_constant_highest(rows), "symplectic", "float64")
    if not f64:
        return None
    worst = max(r["grad_rel_error"] for r in f64)
    solvers = sorted({r["solver"] for r in f64})
    return dict(
        name="float64: symplectic error ≤ 1e-12",
        value=f"max {worst:.2e} over {len(f64)} configurations ("
        + ", ".join(solvers)
        + ")",
        passed=bool(worst <= 1e-12),
    )


def _check_memory(rows):
    nrows = [r for r in rows if r["sweep"] == "n" and r["dtype"] == "float32"]
    if not nrows:
        return []
    n_max = max(r["n_steps"] for r in nrows)
    out = []
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


def _check_adaptive(rows):
    """On an adaptive solve, `SymplecticAdjoint()`'s time at the largest `max_steps` is
    within 1.5× of its time at the smallest (it follows the steps taken), and its memory
    is at most `RecursiveCheckpointAdjoint()`'s at each `max_steps` (both place their
    checkpoints by `max_steps`). `backprop` keeps a state for each of `max_steps`. Times
    as multiples of the forward solve timed beside them, so that the two groups,
    timed apart, compare."""
    timed = {
        (r["strategy"], r["n_steps"]): r
        for r in rows
        if r["sweep"] == "adaptive" and r.get("time_ratio") is not None
    }
    steps = sorted({n for s, n in timed if s == "symplectic_default"})
    if len(steps) < 2 or not all(("diffrax_rca", n) in timed for n in steps):
        return []
    lo, hi = (timed[("symplectic_default", n)] for n in (steps[0], steps[-1]))
    time = hi["time_ratio"] / lo["time_ratio"]
    memory = [
        timed[("symplectic_default", n)]["xla_temp_bytes"]
        / timed[("diffrax_rca", n)]["xla_temp_bytes"]
        for n in steps
    ]
    return [
        dict(
            name="adaptive: SymplecticAdjoint()'s time follows the steps taken, not "
            "max_steps, in at most RecursiveCheckpointAdjoint()'s memory",
            value=f"max_steps {steps[0]} → {steps[-1]}: time ×{time:.2f}; memory "
            + ", ".join(f"{m:.2f}" for m in memory)
            + "× RecursiveCheckpointAdjoint()'s",
            passed=bool(time <= 1.5 and max(memory) <= 1.0),
        )
    ]


def plane_metric(rows: list[dict]) -> str:
    """The memory the plane uses: the device peak where every timed row has one (a GPU
    run: torchdiffeq has no XLA figure), else XLA's static figure."""
    timed = [r for r in rows if r.get("time_ms") is not None]
    if timed and all(r.get("peak_bytes") is not None for r in timed):
        return "peak_bytes"
    return "xla_temp_bytes"


def planes(rows: list[dict]) -> list[dict]:
    """One plane per problem of the `plane` sweep: its exact strategies with time and
    memory, each marked Pareto-optimal or not, and the answers (`answers`)."""
    out = []
    problems = {}
    for r in rows:
        if r["sweep"] == "plane":
            problems.setdefault(group_key(r), []).append(r)
    for members in problems.values():
        metric = plane_metric(members)
        points = [
            dict(
                strategy=r["strategy"],
                bytes=r[metric],
                ms=r["time_ms"],
                q25_ms=r.get("time_q25_ms"),
                q75_ms=r.get("time_q75_ms"),
            )
            for r in members
            if is_exact(r["strategy"])
            and r.get("time_ms") is not None
            and r.get(metric) is not None
        ]
        flags = pareto([(p["bytes"], p["ms"]) for p in points])
        for p, flag in zip(points, flags, strict=True):
            p["pareto"] = flag
        points.sort(key=lambda p: (p["bytes"], p["ms"]))
        first = members[0]
        missing = sorted(
            {r["strategy"] for r in members} - {p["strategy"] for p in points},
            key=order,
        )
        out.append(
            dict(
                solver=first["solver"],
                n_steps=first["n_steps"],
                metric=metric,
                points=points,
                answers=answers(points),
                not_on_plane=missing,
            )
        )
    return out


def answers(points: list[dict]) -> list[dict]:
    """At each memory of the Pareto frontier: the fastest exact gradient within it, and
    Diffrax's fastest within it (`diffrax` None where none fits)."""
    out = []
    for p in points:
        if not p["pareto"]:
            continue
        fits = [
            q for q in points if q["bytes"] <= p["bytes"] and is_diffrax(q["strategy"])
        ]
        best = min(fits, key=lambda q: q["ms"]) if fits else None
        out.append(
            dict(
                bytes=p["bytes"],
                fastest=p["strategy"],
                ms=p["ms"],
                diffrax=best and best["strategy"],
                diffrax_ms=best and best["ms"],
                speedup=best and best["ms"] / p["ms"],
            )
        )
    return out
