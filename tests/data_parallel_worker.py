"""Runs example scripts in a process of its own with a number of host (CPU) devices,
for `tests/test_devices.py`: XLA_FLAGS must be set before JAX is imported, so this
cannot run inside the test process.

    python tests/data_parallel_worker.py SPEC.json RESULTS.json

SPEC: `{"host_devices": N, "runs": [{"example": "spiral", "argv": [...],
"copy_checkpoint": {"at": 2, "to": PATH}}, ...]}`. RESULTS: one entry per run: the
metrics' `loss`, `devices`, `processes` and `memory_bytes`; the collectives in the compiled training
step; or, for a run that exits, its exit code and message.
"""

import contextlib
import io
import json
import os
import re
import shutil
import sys

spec_path, results_path = sys.argv[1:]
with open(spec_path) as f:
    spec = json.load(f)
# Cheaper compiles of the same programs: the runs are compared with each other.
os.environ["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={spec['host_devices']} "
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import neuralode.training as training  # noqa: E402
import neuralode.training._loop as loop  # noqa: E402

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all")
compiled_text: list[str] = []
copies: dict[int, str] = {}


def compile_and_keep_text(run, step, state):
    compiled = compile_step(run, step, state)
    compiled_text.append(compiled.as_text())
    return compiled


def save_and_copy(checkpoint, path):
    save_checkpoint(checkpoint, path)
    if checkpoint.iteration in copies:
        os.makedirs(os.path.dirname(copies[checkpoint.iteration]), exist_ok=True)
        shutil.copy(path, copies[checkpoint.iteration])


compile_step, loop._Run.compile = loop._Run.compile, compile_and_keep_text
save_checkpoint, training.Checkpoint.save = training.Checkpoint.save, save_and_copy


def run(example: str, argv: list[str], copy_checkpoint=None) -> dict:
    copies.clear()
    if copy_checkpoint:
        copies[copy_checkpoint["at"]] = copy_checkpoint["to"]
    compiled_text.clear()
    module = __import__(example)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            metrics = module.main(argv)
    except SystemExit as e:
        return {"exit": e.code, "stderr": stderr.getvalue()}
    text = compiled_text[0] if compiled_text else ""
    return {
        "loss": metrics["loss"],
        "devices": metrics["devices"],
        "processes": metrics["processes"],
        "memory_bytes": metrics["memory_bytes"],
        "collectives": {
            op: len(re.findall(rf"\b{op}(-start)?\(", text)) for op in COLLECTIVES
        },
    }


results = [run(**r) for r in spec["runs"]]
with open(results_path, "w") as f:
    json.dump(results, f)
