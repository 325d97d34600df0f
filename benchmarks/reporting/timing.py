"""Timing in interleaved rounds: every function runs once per round (A, B, C, A, B, C,
...), so that a drift of the machine hits all alike; reported as the median and
interquartile range over the rounds, and as a multiple of a reference of the same round
(e.g. the forward solve)."""

import time

import jax
import numpy as np


def quartiles(values) -> tuple[float, float, float]:
    """(median, 25th percentile, 75th percentile)."""
    q25, median, q75 = np.percentile(np.asarray(values), [25, 50, 75])
    return float(median), float(q25), float(q75)


def time_interleaved(fns: dict, args: tuple, repeats: int):
    """(outputs, {name: per-round times in ms}) of `fns` called on `args`: one untimed
    call each (compilation, first touch of memory), then `repeats` interleaved rounds."""
    outputs = {name: jax.block_until_ready(fn(*args)) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append((time.perf_counter() - start) * 1e3)
    return outputs, {name: np.asarray(t) for name, t in times.items()}


def median_iqr(fns: dict, args: tuple, repeats: int) -> dict:
    """{name: {ms: median, iqr_ms: interquartile range}} of interleaved runs."""
    _, times = time_interleaved(fns, args, repeats)
    out = {}
    for name, t in times.items():
        median, q25, q75 = quartiles(t)
        out[name] = dict(ms=median, iqr_ms=q75 - q25)
    return out


def summary(times, reference=None) -> dict:
    """`time_ms` (median), `time_q25_ms`, `time_q75_ms` of per-round times, and, given
    the `reference`'s times of the same rounds, the median multiple `time_ratio` with
    its quartiles."""
    median, q25, q75 = quartiles(times)
    out = dict(time_ms=median, time_q25_ms=q25, time_q75_ms=q75, repeats=len(times))
    if reference is not None:
        ratio, r25, r75 = quartiles(np.asarray(times) / np.asarray(reference))
        out.update(time_ratio=ratio, time_ratio_q25=r25, time_ratio_q75=r75)
    return out
