"""results.md and the plots, read from results.json alone (so that `--render` can redo
them for any committed run, older formats included)."""

import os

import numpy as np

from reporting import plane as plane_plot
from reporting.analysis import planes
from reporting.problems import T1_TOLERANCE
from reporting.strategies import CORE, DESCRIPTION, PEERS, TORCH, family, label

MIB = 2**20
# (sweep, the row's field it varies, its column's name, title; {n}: the base n).
SWEEP_TABLES = (
    ("n", "n_steps", "n_steps", "Steps n"),
    (
        "adaptive",
        "n_steps",
        "max_steps",
        "Adaptive Tsit5, `max_steps` far above the steps taken (rtol = atol = {tol:g}; "
        "steps taken ≈ nfe fwd / stages; × fwd: the same adaptive forward solve; err: "
        "against float64 `RecursiveCheckpointAdjoint()`, whose solve chooses its own "
        "steps)",
    ),
    ("s", "solver", "solver", "Stages s (n = {n})"),
    ("m", "depth", "depth", "Depth m (n = {n})"),
    ("d", "width", "width", "Width d (n = {n})"),
    ("b", "batch", "batch", "Batch size (n = {n})"),
    ("y", "state_dim", "state_dim", "State size (n = {n})"),
    (
        "precision",
        "precision",
        "precision",
        "JAX's default matmul precision beside `highest` (n = {n}; on NVIDIA GPUs the "
        "default multiplies float32 in TF32; err: against float64)",
    ),
    ("float64", "solver", "solver", "float64 runs (n = {n})"),
    ("float64_n", "n_steps", "n_steps", "float64 at the largest n"),
)


def fmt_bytes(b):
    if b is None:
        return "–"
    return f"{b / MIB:.3f}" if b < 2**30 else f"{b / MIB:.0f}"


def fmt(x, spec):
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return format(x, spec) if not isinstance(x, str) else x


def fmt_time(r) -> str:
    """Median ms, with the interquartile range where the run recorded one."""
    if r.get("time_ms") is None:
        return "–"
    if r.get("time_q25_ms") is None:
        return f"{r['time_ms']:.2f}"
    return f"{r['time_ms']:.2f} ({r['time_q25_ms']:.2f}–{r['time_q75_ms']:.2f})"


def write_markdown(results: dict, out_dir: str) -> str:
    lines = (
        _header(results)
        + _skipped(results)
        + _checks(results)
        + _planes(results)
        + _exponents(results)
        + _sweeps(results)
        + _tolerance(results)
    )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    return text


def _header(results):
    rows = results["rows"]
    interleaved = results.get("timing") == "interleaved"
    versions = (
        f", torch {results['torch']}, torchdiffeq {results['torchdiffeq']}"
        if results.get("torch")
        else ", torchdiffeq not installed"
    )
    timing = (
        f"median (interquartile range) of {results['sizes']['repeats']} rounds in which "
        "each problem's gradients and its forward solve run interleaved; `× fwd` = the "
        "gradient's time over the forward solve's, same round"
        if interleaved
        else f"median of {results['sizes']['repeats']} runs, one configuration at a time"
    )
    families = {family(r["strategy"]) for r in rows}
    return [
        f"# neuralode benchmarks — {results['device']}",
        "",
        f"Command: `{results['command']}`  ",
        f"Device: {results['device']} ({results['backend']}); jax {results['jax']}, "
        f"diffrax {results['diffrax']}, equinox {results['equinox']}, "
        f"Python {results['python']}{versions}  ",
        f"Mode: {results['mode']}; wall time {results['wall_s']:.0f} s; float32 matrix "
        f"products at precision `{results.get('matmul_precision', 'default')}`. Every "
        "figure below is read from `results.json` in this folder.",
        "",
        "Problem: dy/dt = MLP(y) (tanh), t ∈ [0, 1], constant steps 1/n, loss "
        "½·mean(y(1)²), gradient w.r.t. the MLP's parameters and y0. Memory in MiB: "
        "`xla` = XLA's static temporary buffers of the compiled gradient; `peak` = device "
        + ("peak minus the bytes in use" if interleaved else "peak minus the peak")
        + " with the inputs placed (GPU only"
        + _peak_note(results)
        + "). `err` = relative error against float64 backprop of the same "
        "discretisation; `err∞` = against a float64 Dopri8 solve at tol 1e-12. "
        f"Times in ms: {timing}."
        + (
            " `rk4` is torchdiffeq's fixed-grid `rk4` (the 3/8 rule), on both sides."
            if interleaved
            else ""
        ),
        "",
        "Strategies: "
        + "; ".join(f"`{k}` = {v}" for k, v in DESCRIPTION.items() if k in families)
        + ".",
        "",
    ]


def _peak_note(results: dict) -> str:
    if results.get("backend") != "gpu":
        return ""
    if results.get("peak_pool"):
        return f"; allocator pool {results['peak_pool']}"
    # Older results, measured with the pool growing on demand.
    return (
        "; measured with the allocator growing on demand, so a buffer can count as the "
        "whole region grown for it, up to the next power of two, and `states/step (peak)` "
        "is not a per-step figure: read `xla` for growth"
    )


def _skipped(results):
    skipped = results.get("skipped") or []
    if not skipped:
        return ["Every planned configuration was measured.", ""]
    return (
        [f"## Not measured ({len(skipped)})", ""] + [f"- {s}" for s in skipped] + [""]
    )


def _checks(results):
    lines = ["## Checks", "", "| check | measured | holds |", "|---|---|---|"]
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
    return lines


def plane_table(p: dict) -> str:
    """Every exact gradient of one plane, by memory, with the Pareto frontier marked."""
    memory = "peak" if p["metric"] == "peak_bytes" else "xla"
    lines = [
        f"| strategy | {memory} MiB | time ms | Pareto |",
        "|---|---|---|---|",
    ]
    for q in p["points"]:
        lines.append(
            f"| {label(q['strategy'])} | {fmt_bytes(q['bytes'])} | {fmt_time(_t(q))} | "
            f"{'yes' if q['pareto'] else ''} |"
        )
    return "\n".join(lines)


def answer_table(p: dict) -> str:
    """At each memory of the frontier: the fastest exact gradient, and Diffrax's."""
    lines = [
        "| memory ≤ (MiB) | exact gradient of least time | time ms | Diffrax's adjoint of "
        "least time within it | time ms | Diffrax's time / least |",
        "|---|---|---|---|---|---|",
    ]
    for a in p["answers"]:
        theirs = (
            f"{label(a['diffrax'])} | {a['diffrax_ms']:.2f} | {a['speedup']:.2f}×"
            if a["diffrax"]
            else "none fits | – | –"
        )
        lines.append(
            f"| {fmt_bytes(a['bytes'])} | {label(a['fastest'])} | {a['ms']:.2f} | "
            f"{theirs} |"
        )
    return "\n".join(lines)


def _t(q):
    return dict(time_ms=q["ms"], time_q25_ms=q["q25_ms"], time_q75_ms=q["q75_ms"])


def _planes(results):
    lines = []
    for p in planes(results["rows"]):
        name = f"plane_{p['solver']}_{p['n_steps']}"
        memory = "device peak" if p["metric"] == "peak_bytes" else "XLA's temp bytes"
        lines += [
            "",
            f"## Time–memory plane: {p['solver']}, n = {p['n_steps']}",
            "",
            f"Every exact gradient of this problem; memory = {memory}. "
            f"![plane]({name}.png)",
            "",
            plane_table(p),
            "",
            "At this memory, which exact gradient is fastest, and by how much over "
            "Diffrax's best:",
            "",
            answer_table(p),
        ]
        if p["not_on_plane"]:
            lines += [
                "",
                "Not on the plane (not exact, not timed, or without this memory figure): "
                + ", ".join(f"`{s}`" for s in p["not_on_plane"])
                + ".",
            ]
    return lines


def _exponents(results):
    lines = [
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
        cells = [
            fmt(e[k], ".2f")
            for k in (
                "xla_temp_bytes_exp_n",
                "xla_temp_bytes_exp_m",
                "xla_temp_bytes_exp_d",
                "xla_temp_bytes_states_per_step",
                "peak_bytes_exp_n",
                "peak_bytes_states_per_step",
            )
        ]
        lines.append(f"| {e['strategy']} | {promised} | " + " | ".join(cells) + " |")
    return lines


def _sweeps(results):
    rows, sizes = results["rows"], results["sizes"]
    b = rows[0] if rows else {}
    fixed = (
        f"depth {b.get('depth')}, width {b.get('width')}, batch {b.get('batch')}, "
        f"state_dim {b.get('state_dim')}, float32, solver {sizes['solver']}"
    )
    lines = [
        "",
        "## Plots",
        "",
        "![memory vs n](memory_vs_n.png) ![time vs n](time_vs_n.png) "
        "![error vs tolerance](error_vs_tol.png)",
    ]
    for sweep, var, column, title in SWEEP_TABLES:
        sel = [r for r in rows if r["sweep"] == sweep]
        if not sel:
            continue
        title = title.format(n=sizes["n_base"], tol=sel[0].get("tol") or 0)
        title += f" ({fixed})" if sweep in ("n", "adaptive") else ""
        second = "stages" if var == "solver" else "solver"
        lines += [
            "",
            f"## {title}",
            "",
            f"| strategy | {column} | {second} | xla MiB | peak MiB | time ms | × fwd | err "
            "| err∞ | nfe fwd | nfe bwd |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sel:
            lines.append(
                f"| {r['strategy']} | {r[var]} | {r[second]} | "
                f"{fmt_bytes(r.get('xla_temp_bytes'))} | {fmt_bytes(r.get('peak_bytes'))} "
                f"| {fmt_time(r)} | {fmt(r.get('time_ratio'), '.2f')} | "
                f"{fmt(r.get('grad_rel_error'), '.1e')} | "
                f"{fmt(r.get('grad_rel_error_continuous'), '.1e')} | "
                f"{fmt(r.get('nfe_forward'), 'd')} | {fmt(r.get('nfe_backward'), 'd')} |"
            )
    return lines


def _tolerance(results):
    tol_rows = results.get("tolerance_rows", [])
    if not tol_rows:
        return []
    tols = sorted({r["tol"] for r in tol_rows}, reverse=True)
    lines = [
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
    return lines


def plot(results: dict, out_dir: str) -> None:
    """The PNGs that have data: memory and time against n, error against tolerance, and
    one time–memory plane per problem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = [
        ("memory_vs_n", lambda ax: _plot_n(ax, results, "xla_temp_bytes")),
        ("time_vs_n", lambda ax: _plot_n(ax, results, "time_ms")),
        ("error_vs_tol", lambda ax: _plot_tolerance(ax, results)),
    ]
    for p in planes(results["rows"]):
        if p["points"]:
            figures.append(
                (f"plane_{p['solver']}_{p['n_steps']}", _plane_drawer(results, p))
            )
    for name, draw in figures:
        fig, ax = plt.subplots(figsize=(6, 4.2), dpi=80)
        if draw(ax):
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, f"{name}.png"))
        plt.close(fig)


def _plane_drawer(results, p):
    def draw(ax):
        points = [dict(q, label=label(q["strategy"])) for q in p["points"]]
        title = f"{results['device']}: {p['solver']}, n = {p['n_steps']}"
        plane_plot.plot_plane(ax, points, title)
        return True

    return draw


def _plot_n(ax, results, metric) -> bool:
    """Memory (XLA solid, peak dashed) or time against n; whether anything was drawn."""
    rows = [r for r in results["rows"] if r["sweep"] == "n"]
    memory = metric != "time_ms"
    drawn = False
    strategies = [
        s for s in CORE + PEERS + TORCH if any(r["strategy"] == s for r in rows)
    ]
    for i, s in enumerate(strategies):
        styles = (
            ((metric, "o-"), ("peak_bytes", "s--")) if memory else ((metric, "o-"),)
        )
        for m, style in styles:
            pts = sorted(
                (r["n_steps"], r[m])
                for r in rows
                if r["strategy"] == s and r.get(m) is not None
            )
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            ys = [y / MIB for y in ys] if memory else ys
            label_ = s if m != "peak_bytes" else f"{s} (peak)"
            ax.plot(xs, ys, style, color=f"C{i}", label=label_, ms=3, lw=1)
            drawn = True
    if not drawn:
        return False
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("steps n")
    ax.set_ylabel("memory (MiB)" if memory else "time per gradient (ms)")
    ax.set_title(
        results["device"] + (": XLA temp (solid), peak (dashed)" if memory else ""),
        fontsize=9,
    )
    ax.legend(fontsize=6)
    return True


def _plot_tolerance(ax, results) -> bool:
    """Gradient error against the converged solve vs tolerance; whether drawn."""
    drawn = False
    for i, strategy in enumerate(("continuous", "symplectic")):
        for dtype, style in (("float64", "o-"), ("float32", "s--")):
            pts = sorted(
                (r["tol"], r["grad_rel_error_continuous"])
                for r in results.get("tolerance_rows", [])
                if (r["strategy"], r["dtype"]) == (strategy, dtype)
                and r["grad_rel_error_continuous"] is not None
            )
            if pts:
                xs, ys = zip(*pts, strict=True)
                label_ = f"{strategy} {dtype}"
                ax.plot(xs, ys, style, color=f"C{i}", label=label_, ms=3, lw=1)
                drawn = True
    if not drawn:
        return False
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("rtol = atol")
    ax.set_ylabel("gradient error vs converged solve")
    ax.set_title(f"{results['device']}: adaptive Tsit5", fontsize=9)
    ax.legend(fontsize=7)
    return True
