"""Measurements in fresh processes, one at a time, while the main process waits: device
peaks (the peak never goes down within a process) and torchdiffeq (`torch_side`).

A peak process compiles its configurations side by side, then runs them one at a time
in increasing order of XLA's memory figure: each run's peak minus the bytes in use with
its inputs placed is its peak, provided the process's peak rose (a peak below an earlier
configuration's cannot be seen; such a configuration is measured again in a process of
its own). The pool is preallocated: XLA's BFC allocator counts whole chunks as in use,
and a chunk under twice the request is not split; growing on demand, its regions double
in size, so a buffer could count as its whole region, up to the next power of two.
Carved from one preallocated region, every chunk is split to the request."""

import concurrent.futures
import json
import os
import subprocess
import sys
import time

from reporting.problems import config_key
from reporting.solve import config_gradient, setup_jax

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(HERE)
PEAK_POOL_FRACTION = 0.5  # of the device, for the one peak process at a time
PEAK_ENV = dict(
    XLA_PYTHON_CLIENT_PREALLOCATE="true",
    XLA_PYTHON_CLIENT_MEM_FRACTION=str(PEAK_POOL_FRACTION),
    # With autotuning on, the compiler's own peak hides the solve.
    XLA_FLAGS="--xla_gpu_autotune_level=0",
)


def peak_worker(configs: list[dict]) -> list[dict]:
    """{peak_bytes} or {error} of each configuration, in order (see the module)."""
    jax = setup_jax()
    device = jax.devices()[0]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        compiled = list(pool.map(_compile, configs))
    out = []
    for fn, params, y0 in compiled:
        jax.block_until_ready((params, y0))
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" not in stats:
            out.append(dict(peak_bytes=None))
            continue
        before = stats["peak_bytes_in_use"]
        jax.block_until_ready(fn(params, y0))
        peak = device.memory_stats()["peak_bytes_in_use"]
        if peak > before:
            out.append(dict(peak_bytes=int(peak - stats["bytes_in_use"])))
        else:
            out.append(dict(error="below an earlier peak in this process"))
        del params, y0
    return out


def _compile(c):
    g, params, y0 = config_gradient(c)
    return g.lower(params, y0).compile(), params, y0


def measure_peaks(configs: list[dict], xla_bytes: dict, deadline: float):
    """(peaks by config key, skip entries): one process for all, then one each for
    those whose peak it could not see."""
    order = sorted(configs, key=lambda c: xla_bytes[config_key(c)])
    peaks, skipped = {}, []
    retry = []
    result, error = run_worker("peak", order, worker_env(**PEAK_ENV), deadline)
    for c, r in zip(order, result or [{"error": error}] * len(order), strict=True):
        if r.get("error"):
            retry.append((c, r["error"]))
        else:
            peaks[config_key(c)] = r["peak_bytes"]
    for c, first_error in retry:
        result, error = run_worker("peak", [c], worker_env(**PEAK_ENV), deadline)
        if result and not result[0].get("error"):
            peaks[config_key(c)] = result[0]["peak_bytes"]
        else:
            skipped.append(f"peak {config_key(c)}: {error or first_error}")
    return peaks, skipped


def run_worker(kind: str, payload, env: dict, deadline: float, script=None):
    """Run `SCRIPT --{kind}-worker PAYLOAD` (default SCRIPT: report.py) in a fresh
    process until `deadline`: (result, error)."""
    timeout = deadline - time.perf_counter()
    if timeout < 5:
        return None, "time budget"
    script = script or os.path.join(HERE, "report.py")
    try:
        proc = subprocess.run(
            [sys.executable, script, f"--{kind}-worker", json.dumps(payload)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None, "time budget (worker timed out)"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        # The exception's own line, not JAX's note on filtered traceback frames.
        err = proc.stderr.strip().splitlines() or ["no output"]
        return None, next((x for x in err[::-1] if "Error" in x), err[-1])[:300]
    return json.loads(lines[-1][len("RESULT ") :]), None


def worker_env(**changes) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(changes)
    return env


def probe_backend() -> str:
    """JAX's default backend, asked in a fresh process (before this one imports JAX)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.default_backend())"],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else "unknown"
