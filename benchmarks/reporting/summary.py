"""The README's summaries of a committed run, generated from its results.json
(`python benchmarks/report.py --summary DIR`), so that no figure is typed by hand."""

from reporting.analysis import planes
from reporting.render import answer_table

MIB = 2**20


def _at(rows, strategy, n, sweep="n"):
    return next(
        (
            r
            for r in rows
            if (r["sweep"], r["strategy"], r["n_steps"], r["dtype"])
            == (sweep, strategy, n, "float32")
        ),
        None,
    )


def _mib(x) -> str:
    return f"{x / MIB:.0f}" if x >= 100 * MIB else f"{x / MIB:.1f}"


def gpu_memory(results: dict, folder: str) -> str:
    """Memory, time and error at the largest n of the steps sweep (a GPU run: peaks)."""
    rows = results["rows"]
    n = max(r["n_steps"] for r in rows if r["sweep"] == "n")
    b, s, c = (_at(rows, k, n) for k in ("backprop", "symplectic", "continuous"))
    rca, torch = _at(rows, "diffrax_rca_n", n), _at(rows, "torch_odeint", n)
    per_step = {e["strategy"]: e for e in results["exponents"]}
    f64 = [r for r in rows if r["sweep"] == "float64" and r["strategy"] == "symplectic"]
    w, d = b["width"], b["state_dim"]
    text = (
        f"Memory and gradient error of every strategy beside Diffrax's own adjoints and "
        f"torchdiffeq, on one {results['device']} (`{results['command']}`; "
        f"[results]({folder}/results.md)): at n = {n} {b['solver'].capitalize()} steps "
        f"of an MLP({d}→{w}→{w}→{d}) field over a batch of {b['batch']} in float32, "
        f"XLA's static memory of the gradient is {_mib(b['xla_temp_bytes'])} MiB for "
        f"`backprop`, {_mib(s['xla_temp_bytes'])} MiB for `symplectic` and "
        f"{_mib(c['xla_temp_bytes'])} MiB for `continuous`, and the measured device peaks "
        f"are {_mib(b['peak_bytes'])}, {_mib(s['peak_bytes'])} and "
        f"{_mib(c['peak_bytes'])} MiB; `symplectic` adds "
        f"{per_step['symplectic']['peak_bytes_states_per_step']:.2f} states per step, "
        f"`backprop` {per_step['backprop']['peak_bytes_states_per_step']:.0f}."
    )
    if rca:
        text += (
            f" Diffrax's `RecursiveCheckpointAdjoint(checkpoints=n)`, which also keeps "
            f"every step, peaks at {_mib(rca['peak_bytes'])} MiB "
            f"({per_step['diffrax_rca_n']['peak_bytes_states_per_step']:.2f} states per "
            "step)"
        )
        text += (
            f"; torchdiffeq's `odeint` (RK4, same grid) at {_mib(torch['peak_bytes'])} MiB."
            if torch
            else "."
        )
    named = (
        (b, "backprop"),
        (s, "symplectic"),
        (c, "continuous"),
        (rca, "RecursiveCheckpointAdjoint(checkpoints=n)"),
    )
    times = [(r, k) for r, k in named if r and r.get("time_ms")]
    text += " The same gradients took " + ", ".join(
        f"{r['time_ms']:.0f} ms (`{k}`)" for r, k in times
    )
    text += (
        f". In float32 with full-precision matrix products, `symplectic`'s error "
        f"against the float64 discrete gradient is {s['grad_rel_error']:.1e} beside "
        f"`backprop`'s {b['grad_rel_error']:.1e}; in float64 it matches to "
        f"{max(r['grad_rel_error'] for r in f64):.1e} ("
        + ", ".join(r["solver"].capitalize() for r in f64)
        + ")."
    )
    return text


def plane_answers(results: dict) -> str:
    """Each plane's answer table, with its problem as a heading line."""
    blocks = []
    for p in planes(results["rows"]):
        memory = "device peak" if p["metric"] == "peak_bytes" else "XLA's temp memory"
        blocks.append(
            f"{p['solver']}, n = {p['n_steps']} ({memory}, {results['device']}):\n\n"
            + answer_table(p)
        )
    return "\n\n".join(blocks)


def summaries(results: dict, folder: str) -> str:
    parts = []
    if results.get("backend") == "gpu":
        parts.append(gpu_memory(results, folder))
    if planes(results["rows"]):
        parts.append(plane_answers(results))
    return "\n\n".join(parts)
