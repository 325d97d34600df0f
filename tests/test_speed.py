"""`benchmarks/speed.py` runs; the README's speed table is the committed CPU results;
every claim in the README or a docstring about which strategy is faster agrees with
every `benchmarks/results/*/speed.json`."""

import ast
import glob
import json
import os
import re
import sys

import neuralode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import speed  # noqa: E402


def test_speed_script_quick(tmp_path, monkeypatch):
    # Two strategies and one adaptive max_steps keep the compiles few.
    two = [s for s in speed.STRATEGIES if s[0] in ("backprop", "diffrax_rca")]
    monkeypatch.setattr(speed, "STRATEGIES", two)
    quick = dict(speed.SIZES["quick"], adaptive_max_steps=(16,))
    monkeypatch.setitem(speed.SIZES, "quick", quick)
    out = tmp_path / "speed.json"
    result = speed.main(["--quick", "--repeats", "2", "--json", str(out)])
    with open(out) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    constant, adaptive = result["problems"]
    assert (constant["num_steps"], adaptive["num_steps"]) == (8, 3)
    names = [r["strategy"] for r in constant["results"]]
    assert names == [
        "backprop",
        "diffrax_rca",
        "scan_tsit5_step",
        "scan_unrolled_tsit5",
    ]
    for entry in result["problems"]:
        assert entry["forward"]["median_ms"] > 0 and not entry["skipped"]
        for r in entry["results"]:
            assert r["ratio_q25"] <= r["ratio"] <= r["ratio_q75"]
            assert r["xla_temp_bytes"] > 0
            assert r["grad_rel_difference"] < 1e-5  # float32, same discretisation
    assert "| 8 constant steps, max_steps 8 | " in speed.render(result)


def test_readme_speed_table_is_the_committed_cpu_results():
    with open(os.path.join(ROOT, "benchmarks", "results", "cpu", "speed.json")) as f:
        table = speed.render(json.load(f))
    with open(os.path.join(ROOT, "README.md")) as f:
        assert table in f.read()


# Speed claims: a sentence (or a table row) with one of these words, the strategies it
# names in order (the first is its subject), checked against the median times.
SPEED_WORD = re.compile(r"\b(fastest|slowest|faster|slower|quicker|quickest)\b", re.I)
NAMES = [
    (r"RecursiveCheckpointAdjoint\(checkpoints=n\)", "diffrax_rca_n"),
    (r"RecursiveCheckpointAdjoint\(\)", "diffrax_rca"),
    (r"\bBackpropAdjoint\b|\bbackprop\b", "backprop"),
    (r"\bSymplecticAdjoint\b|\bsymplectic\b", "symplectic"),
    (r"\bContinuousAdjoint\b|\bcontinuous\b", "continuous"),
]
EXACT = ("backprop", "symplectic")


def _named(sentence):
    found = []
    for pattern, name in NAMES:
        found += [(m.start(), name) for m in re.finditer(pattern, sentence)]
    names = []
    for _, name in sorted(found):
        if name not in names:
            names.append(name)
    return names


def claims(text, default=None):
    """(sentence, word, subject, other or None, exact) for each speed claim in `text`
    (prose: fenced code is left out)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    units = []
    for paragraph in re.split(r"\n\s*\n", text):
        if paragraph.lstrip().startswith("|"):
            units += paragraph.splitlines()  # a table: row by row
        else:
            units += re.split(r"(?<=[.;:])\s+", " ".join(paragraph.split()))
    found = []
    for unit in units:
        for match in SPEED_WORD.finditer(unit):
            names = _named(unit) or ([default] if default else [])
            assert names, f"a speed claim that names no strategy: {unit!r}"
            word = match.group(1).lower()
            exact = "exact" in unit[match.end() : match.end() + 12]
            other = names[1] if len(names) > 1 else None
            found.append((unit, word, names[0], other, exact))
    return found


def holds(claim, problems):
    """Whether the claim holds in every problem that measured what it compares, and
    there is at least one."""
    _, word, subject, other, exact = claim
    registry = [n for n in neuralode.ADJOINT_NAMES if not exact or n in EXACT]
    checked = 0
    for _, times in problems:
        if subject not in times:
            continue
        if word in ("fastest", "quickest", "slowest"):
            rivals = [times[n] for n in registry if n != subject and n in times]
        else:
            assert other is not None, f"{word!r} compares with nothing: {claim[0]!r}"
            rivals = [times[other]] if other in times else []
        if not rivals:
            continue
        checked += 1
        faster = word in ("fastest", "quickest", "faster", "quicker")
        if (faster and times[subject] > min(rivals)) or (
            not faster and times[subject] < max(rivals)
        ):
            return False
    return checked > 0


def _texts():
    """(where, text, default subject) of the README and every docstring."""
    with open(os.path.join(ROOT, "README.md")) as f:
        yield "README.md", f.read(), None
    for path in glob.glob(
        os.path.join(ROOT, "neuralode", "**", "*.py"), recursive=True
    ):
        module = os.path.basename(path)[:-3].lstrip("_")
        default = module if module in neuralode.ADJOINT_NAMES else None
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(
                node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
            ):
                doc = ast.get_docstring(node)
                if doc:
                    yield os.path.relpath(path, ROOT), doc, default


def _results():
    problems = []
    for path in glob.glob(
        os.path.join(ROOT, "benchmarks", "results", "*", "speed.json")
    ):
        with open(path) as f:
            problems += speed.median_times(json.load(f))
    return problems


def test_speed_claims_agree_with_the_results():
    problems = _results()
    assert problems
    for where, text, default in _texts():
        for claim in claims(text, default):
            assert holds(claim, problems), (
                f"{where}: not what the results say: {claim[0]!r}"
            )


def test_speed_claims_are_checked():
    # The checker itself, on made-up results.
    problems = [("a", dict(backprop=3.0, symplectic=2.0, continuous=1.0))]
    true = "`symplectic` is the fastest exact strategy; `continuous` is the fastest."
    false = "| `backprop` | keeps all | fastest |\n\n`backprop` is faster than `symplectic`."
    assert all(holds(c, problems) for c in claims(true))
    assert len(claims(false)) == 2
    assert not any(holds(c, problems) for c in claims(false))
    assert not holds(claims("`backprop` is the slowest.")[0], [("b", {})])  # unmeasured
