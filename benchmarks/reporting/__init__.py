"""The pieces of the benchmark report (`benchmarks/report.py`): problems, strategies,
measuring in this process and in workers, analysis, and rendering. `timing` and `plane`
are shared with `speed.py` and `checkpoints.py`."""
