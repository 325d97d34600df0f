"""Smoke tests of the benchmark scripts on tiny sizes (the scripts themselves are run
by hand: `python benchmarks/report.py --quick`)."""

import importlib
import json
import os
import sys
import time

import numpy as np
import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import modes  # noqa: E402
import report  # noqa: E402
import scaling  # noqa: E402
from reporting import (  # noqa: E402
    analysis,
    budget,
    plane,
    problems,
    render,
    run,
    strategies,
    workers,
)
from reporting.problems import SIZES, plan  # noqa: E402

ROW_FIELDS = (
    "strategy",
    "solver",
    "n_steps",
    "depth",
    "width",
    "batch",
    "state_dim",
    "dtype",
    "xla_temp_bytes",
    "peak_bytes",
    "time_ms",
    "time_q25_ms",
    "time_q75_ms",
    "time_ratio",
    "grad_rel_error",
    "grad_rel_error_continuous",
    "nfe_forward",
    "nfe_backward",
)
TINY = dict(
    state_dim=2,
    batch=2,
    width=4,
    depth=1,
    solver="heun",
    n_sweep=(4,),
    n_base=4,
    depths=(1,),
    widths=(4,),
    solvers=("heun",),
    tols=(1e-3,),
    peers_n=(),
    peers_n_steps=(),
    float64_strategies=(),
    plane_steps=(4,),
    ladder=(2,),
    adaptive_max_steps=(16,),
    adaptive_strategies=("symplectic_default",),
    float64_n_strategies=(),
    precision_strategies=("symplectic",),
    batches=(),
    state_dims=(),
    repeats=3,
    budget_s=600,
)


def test_plan_covers_every_sweep():
    sweeps = {"n", "m", "d", "s", "b", "y", "float64", "float64_n", "plane"}
    sweeps |= {"adaptive", "precision"}
    for mode in ("quick", "full"):
        configs = plan(SIZES[mode])
        assert {c["sweep"] for c in configs} == sweeps
        adaptive = [c for c in configs if c["sweep"] == "adaptive"]
        assert max(c["n_steps"] for c in adaptive) >= 64 * budget.ADAPTIVE_STEPS
        assert {c["precision"] for c in configs} == {"highest", "default"}
        n_max = max(c["n_steps"] for c in configs if c["sweep"] == "n")
        assert {c["n_steps"] for c in configs if c["sweep"] == "float64_n"} == {n_max}
    full = plan(SIZES["full"])
    assert set(strategies.PEERS) - {"diffrax_backsolve"} <= {
        c["strategy"] for c in full
    }
    on_plane = {c["strategy"] for c in full if c["sweep"] == "plane"}
    assert {"symplectic_c4", "diffrax_rca_c4", "torch_odeint"} <= on_plane
    assert {c["solver"] for c in full if c["sweep"] == "plane"} == {"rk4"}


def test_plan_is_cut_to_its_budget_by_its_estimate():
    configs = plan(SIZES["full"])
    kw = dict(backend="gpu", threads=8, repeats=11)
    kept, cut = budget.fit(configs, 60, **kw)
    assert kept == configs[: len(kept)] and kept + cut == configs and cut
    assert budget.estimate_s(kept, **kw) <= 0.9 * 60
    # More checkpoints, fewer recomputing sweeps.
    assert budget.sweeps_over(1024, 4) > budget.sweeps_over(1024, 64) >= 1


def test_report_runs_end_to_end(tmp_path, monkeypatch):
    # The whole script on the smallest plan: threads, timings, plane, outputs.
    monkeypatch.setitem(SIZES, "quick", TINY)
    on_plane = ("backprop", "symplectic_c2", "diffrax_rca_c2", "torch_odeint")
    monkeypatch.setattr(problems, "plane_strategies", lambda sizes: on_plane)
    report.main(["--quick", "--out", str(tmp_path)])
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    # Everything planned is measured or listed (torch: measured only where installed).
    listed = " ".join(results["skipped"])
    measured = {(r["sweep"], r["strategy"], r["n_steps"]) for r in results["rows"]}
    for c in plan(TINY):
        assert (c["sweep"], c["strategy"], c["n_steps"]) in measured or (
            repr(run.config_key(c)) in listed
        )
    assert not [s for s in results["skipped"] if "torch" not in s]
    assert {r["strategy"] for r in results["tolerance_rows"]} == set(
        strategies.TOLERANCE
    )
    rows = {
        (r["strategy"], r["n_steps"], r["dtype"], r["solver"]): r
        for r in results["rows"]
        if not r["strategy"].startswith("torch")
    }
    for row in rows.values():
        for field in ROW_FIELDS:
            assert field in row
        assert row["xla_temp_bytes"] > 0 and row["time_ms"] > 0
        assert row["time_q25_ms"] <= row["time_ms"] <= row["time_q75_ms"]
        assert row["peak_bytes"] is None  # CPU
    row = rows[("symplectic", 4, "float32", "heun")]
    assert row["grad_rel_error"] < 1e-5  # float32 against float64, same discretisation
    assert row["nfe_forward"] == 4 * 2  # Heun: 4 steps, 2 stages
    assert row["nfe_backward"] > 0
    assert rows[("symplectic", 4, "float64", "heun")]["grad_rel_error"] < 1e-12
    # The RK4 plane: checkpointed symplectic is exact too, and the plane is answered.
    assert rows[("symplectic_c2", 4, "float32", "rk4")]["grad_rel_error"] < 1e-5
    text = (tmp_path / "results.md").read_text()
    assert "## Time–memory plane: rk4, n = 4" in text
    assert "by how much over Diffrax's best" in text
    assert (tmp_path / "plane_rk4_4.png").exists()
    # The adaptive solve takes fewer steps than its max_steps; precision is a row field.
    (adaptive,) = [r for r in results["rows"] if r["sweep"] == "adaptive"]
    assert adaptive["tol"] == problems.ADAPTIVE_TOL
    assert 0 < adaptive["nfe_forward"] < 8 * adaptive["stages"]  # max_steps is 16
    assert adaptive["grad_rel_error"] < 1e-3  # float32 steps may differ from float64's
    assert {r["precision"] for r in results["rows"] if r["sweep"] == "precision"} == {
        "highest",
        "default",
    }
    assert "## Adaptive Tsit5" in text and "## JAX's default matmul precision" in text


def _rows():
    row = dict(
        plan(TINY)[0],
        xla_temp_bytes=1,
        peak_bytes=None,
        time_ms=1.0,
        grad_rel_error=1e-7,
        grad_rel_error_continuous=1e-6,
        nfe_forward=8,
        nfe_backward=12,
    )
    rows = []
    for s, mem in (
        ("backprop", lambda n: 1000 * n),
        ("symplectic", lambda n: 16 * n + 50),
        ("continuous", lambda n: 40),
    ):
        for n in (16, 64, 256):
            rows.append(
                dict(
                    row,
                    sweep="n",
                    strategy=s,
                    n_steps=n,
                    xla_temp_bytes=mem(n),
                    state_bytes=16,
                )
            )
    # A plane: symplectic_c2 dominates diffrax_rca_c2; backprop is fastest.
    for s, mem, ms in (
        ("backprop", 100, 1.0),
        ("symplectic_c2", 10, 3.0),
        ("diffrax_rca_c2", 12, 4.0),
        ("diffrax_rca_n", 50, 2.0),
        ("continuous", 5, 0.5),  # not exact: not on the plane
    ):
        rows.append(
            dict(
                row,
                sweep="plane",
                solver="rk4",
                strategy=s,
                xla_temp_bytes=mem,
                time_ms=ms,
            )
        )
    return rows


def test_plane_frontier_and_answers():
    assert plane.pareto([(1, 3), (2, 2), (3, 3), (1, 4)]) == [True, True, False, False]
    (p,) = analysis.planes(_rows())
    on = {q["strategy"]: q["pareto"] for q in p["points"]}
    assert on == dict(
        backprop=True, symplectic_c2=True, diffrax_rca_c2=False, diffrax_rca_n=True
    )
    assert p["not_on_plane"] == ["continuous"]
    by_memory = {a["bytes"]: a for a in p["answers"]}
    assert by_memory[10]["diffrax"] is None  # no Diffrax adjoint fits in 10 bytes
    assert by_memory[100]["fastest"] == "backprop"
    assert by_memory[100]["speedup"] == pytest.approx(2.0)  # rca_n's 2 ms over 1 ms


def _adaptive_rows(ratio_at_4096, memory_at_4096):
    base = dict(sweep="adaptive", tol=1e-6, time_ms=1.0, dtype="float32")
    return [
        dict(base, strategy="symplectic_default", n_steps=64, time_ratio=3.0)
        | dict(xla_temp_bytes=30),
        dict(base, strategy="diffrax_rca", n_steps=64, time_ratio=3.5)
        | dict(xla_temp_bytes=40),
        dict(
            base, strategy="symplectic_default", n_steps=4096, time_ratio=ratio_at_4096
        )
        | dict(xla_temp_bytes=memory_at_4096),
        dict(base, strategy="diffrax_rca", n_steps=4096, time_ratio=4.0)
        | dict(xla_temp_bytes=140),
    ]


@pytest.mark.parametrize(
    "ratio, memory, holds",
    [(3.2, 130, True), (5.0, 130, False), (3.2, 150, False)],
)
def test_adaptive_check(ratio, memory, holds):
    # Time (as a multiple of the forward solve) follows the steps taken, not
    # max_steps, in at most RecursiveCheckpointAdjoint()'s memory at each max_steps.
    (check,) = analysis._check_adaptive(_adaptive_rows(ratio, memory))
    assert check["passed"] is holds


def test_float32_check_compares_constant_steps_at_full_precision():
    # TF32 products (precision "default") or adaptive steps must not enter the check,
    # and a row that is in several sweeps counts once.
    row = dict(plan(TINY)[0], dtype="float32", grad_rel_error=1e-7)
    rows = [
        dict(row, strategy="backprop"),
        dict(row, strategy="symplectic"),
        dict(row, strategy="symplectic", sweep="m"),
        dict(row, strategy="backprop", precision="default", grad_rel_error=1e-7),
        dict(row, strategy="symplectic", precision="default", grad_rel_error=1e-3),
    ]
    (check,) = [c for c in analysis.checks(rows) if c["name"].startswith("float32")]
    assert check["passed"] and "over 1 configurations" in check["value"]


def test_exponents_checks_and_output(tmp_path):
    rows = _rows()
    table = {e["strategy"]: e for e in analysis.exponents(rows)}
    assert table["backprop"]["xla_temp_bytes_exp_n"] == pytest.approx(1.0)
    assert table["continuous"]["xla_temp_bytes_exp_n"] == pytest.approx(0.0, abs=1e-9)
    assert table["symplectic"]["xla_temp_bytes_states_per_step"] == pytest.approx(1.0)
    checks = analysis.checks(rows)
    assert all(ch["passed"] for ch in checks)
    results = dict(
        device="test",
        backend="cpu",
        jax="x",
        diffrax="x",
        equinox="x",
        python="x",
        command="python benchmarks/report.py --test",
        mode="test",
        timing="interleaved",
        sizes=TINY,
        rows=rows,
        exponents=list(table.values()),
        checks=checks,
        tolerance_rows=[
            dict(
                strategy="symplectic",
                dtype="float64",
                tol=1e-3,
                grad_rel_error_continuous=1e-4,
            )
        ],
        skipped=[f"reason {i}" for i in range(12)],
        wall_s=0.0,
    )
    text = render.write_markdown(results, str(tmp_path))
    assert "python benchmarks/report.py --test" in text
    assert "## Not measured (12)" in text and "- reason 11" in text  # the whole list
    # GPU peaks say how the allocator pool was set up (older results: rounded peaks).
    gpu = dict(results, backend="gpu")
    assert "power of two" in render.write_markdown(gpu, str(tmp_path))
    gpu["peak_pool"] = "preallocated, fraction 0.5"
    assert "fraction 0.5" in render.write_markdown(gpu, str(tmp_path))
    render.plot(results, str(tmp_path))
    for name in ("results.md", "memory_vs_n.png", "time_vs_n.png", "error_vs_tol.png"):
        assert (tmp_path / name).exists()


def test_modes_tiny(tmp_path):
    sizes = dict(
        ds=(4, 8),
        m_time=2,
        ms=(1, 2),
        d_time=8,
        m_error=(1, 2),
        d_error=8,
        conds=(1.0, 1e2),
        repeats=1,
        trials=1,
    )
    result = modes.measure(sizes)
    # The four methods compute the same gradient.
    for e in result["errors"]:
        assert e["rel_error_median"] < 1e-4
    result["summary"] = modes.summarise(result)
    result["verdict"] = modes.verdict(result["summary"])
    result.update(device="test", jax="x", python="x")
    text = modes.write(result, str(tmp_path), "python benchmarks/modes.py --test")
    assert "forward_recursion" in text and (tmp_path / "modes.md").exists()
    by = {s["method"]: s for s in result["summary"]}
    # Memory of the forward recursion does not grow with the depth.
    assert by["forward_recursion"]["memory_exp_m"] < 0.5
    assert np.isfinite(by["backward_recursion"]["time_exp_d"])


def test_readme_time_memory_table_is_the_committed_cpu_results():
    # The README quotes the constant-steps table of benchmarks/checkpoints.py's CPU run.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(
        os.path.join(root, "benchmarks", "results", "cpu", "checkpoints.md")
    ) as f:
        results = f.read()
    start = results.index("| strategy | memory (MiB) | time (ms) | Pareto |")
    table = results[start : results.index("## Adaptive solve")].strip()
    with open(os.path.join(root, "README.md")) as f:
        assert table in f.read()


def test_readme_stability_tables_are_the_committed_cpu_results():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "benchmarks", "results", "cpu", "stability.md")) as f:
        results = f.read()
    with open(os.path.join(root, "README.md")) as f:
        readme = f.read()
    tables = [block for block in results.split("\n\n") if block.startswith("|")]
    assert len(tables) == 2
    for table in tables:
        assert table.strip() in readme


@pytest.mark.parametrize("name", ["cnf_tabular", "time_to_target", "cpu_allocator"])
def test_readme_tables_are_the_committed_cpu_results(name):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "benchmarks", "results", "cpu", f"{name}.md")) as f:
        results = f.read()
    with open(os.path.join(root, "README.md")) as f:
        readme = f.read()
    (table,) = [block for block in results.split("\n\n") if block.startswith("|")]
    assert table.strip() in readme


@pytest.mark.parametrize("name", ["cnf_tabular", "time_to_target", "cpu_allocator"])
def test_committed_tables_render_from_their_json(name):
    # Each .md is its script's rendering of the committed .json, nothing typed by hand.
    module = importlib.import_module(name)
    folder = os.path.join(BENCHMARKS, "results", "cpu")
    with open(os.path.join(folder, f"{name}.json")) as f:
        result = json.load(f)
    with open(os.path.join(folder, f"{name}.md")) as f:
        assert module.render(result) == f.read()


def test_committed_scaling_results(tmp_path):
    # benchmarks/scaling.py's CPU run: its Markdown is rendered from its JSON, and on 4
    # devices each needs about the memory of one device with a quarter of the batch.
    results = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results")
    with open(os.path.join(results, "cpu", "scaling.json")) as f:
        result = json.load(f)
    result["checks"] = scaling.checks(result)
    scaling.render(result, str(tmp_path))
    with open(os.path.join(results, "cpu", "scaling.md")) as f:
        assert (tmp_path / "scaling.md").read_text() == f.read()
    rows = {(r["strategy"], r["devices"], r["batch"]): r for r in result["rows"]}
    batch = result["size"]["batch"]
    assert "forced host devices" in result["device"]
    assert set(result["strategies"]) <= {s for s, _, _ in rows}
    assert 4 in result["device_counts"]
    for strategy in result["strategies"]:
        one, four = rows[strategy, 1, batch], rows[strategy, 4, batch]
        share = rows[strategy, 1, batch // 4]
        assert four["temp_bytes"] <= 1.2 * share["temp_bytes"], strategy
        np.testing.assert_allclose(four["loss"], one["loss"], rtol=1e-5)


def test_readme_report_summaries_are_the_committed_results():
    # Every report.py figure in the README is `report.py --summary DIR` of a committed
    # results folder.
    from reporting import summary

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        readme = f.read()
    for folder in ("cpu", "nvidia-h100-80gb-hbm3"):
        path = os.path.join("benchmarks", "results", folder)
        with open(os.path.join(root, path, "results.json")) as f:
            text = summary.summaries(json.load(f), path)
        assert text
        for block in text.split("\n\n"):  # tables verbatim, prose as wrapped
            if block.startswith("|"):
                assert block in readme, block[:80]
            else:
                assert " ".join(block.split()) in " ".join(readme.split()), block[:80]


def test_readme_xla_flags_sentence_is_the_committed_results():
    import xla_flags

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        readme = " ".join(f.read().split())
    path = "benchmarks/results/nvidia-h100-80gb-hbm3/xla_flags.json"
    with open(os.path.join(root, path)) as f:
        assert " ".join(xla_flags.summary(json.load(f)).split()) in readme


def test_peak_worker_runs_in_a_fresh_process():
    # The plumbing of the peak processes (on a CPU there is no peak to read).
    c = dict(plan(TINY)[0], n_steps=2)
    deadline = time.perf_counter() + 300
    peaks, skipped = workers.measure_peaks([c], {run.config_key(c): 1}, deadline)
    assert skipped == [] and peaks == {run.config_key(c): None}
