#!/usr/bin/env bash
# Run every benchmark on one GPU machine and leave all outputs in one folder.
#
#   bash benchmarks/gpu.sh OUT_DIR [--quick] [more report.py options, e.g. --budget-s 300]
#
# Needs only the preinstalled jax/diffrax/equinox (and torch + torchdiffeq, optional):
# the repository is put on PYTHONPATH, nothing is installed. Sized to finish in under
# 8 minutes on one H100/H200: modes.py, speed.py and checkpoints.py (fixed sizes) run
# first, then report.py gets what is left of TOTAL_S seconds (default 460) as its time
# budget, stops starting new configurations at it and lists what it skipped. Device
# peaks are measured by report.py itself in fresh processes, one per configuration,
# each in a preallocated pool and with XLA_FLAGS=--xla_gpu_autotune_level=0; timings
# run in the main process with autotuning on. Without a GPU it warns and runs the
# --quick sizes instead.
set -u -o pipefail
OUT=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [--quick]}
shift
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
start=$(date +%s)

backend=$("$PYTHON" -c "import jax; print(jax.default_backend())" 2>/dev/null | tail -n 1)
REPORT_ARGS=("$@")
QUICK_ARGS=()
if [[ " ${REPORT_ARGS[*]-} " == *" --quick "* ]]; then
    QUICK_ARGS+=(--quick)
elif [ "$backend" != "gpu" ]; then
    echo "gpu.sh: no GPU (JAX backend: ${backend:-unknown}); running the --quick sizes." >&2
    REPORT_ARGS+=(--quick)
    QUICK_ARGS+=(--quick)
fi
{
    echo "backend: $backend"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    "$PYTHON" --version
} > "$OUT/device.txt" 2>&1

status=0
"$PYTHON" benchmarks/modes.py ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"} --out "$OUT" 2>&1 | tee "$OUT/modes.log" || status=1
"$PYTHON" benchmarks/speed.py ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"} --json "$OUT/speed.json" 2>&1 | tee "$OUT/speed.log" || status=1
"$PYTHON" benchmarks/checkpoints.py ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"} --out "$OUT" 2>&1 | tee "$OUT/checkpoints.log" || status=1
if [[ " ${REPORT_ARGS[*]-} " != *" --quick "* && " ${REPORT_ARGS[*]-} " != *" --budget-s "* ]]; then
    # 20 s for the report's start-up and rendering; at least 120 s whatever is left.
    left=$(( ${TOTAL_S:-460} - ($(date +%s) - start) - 20 ))
    REPORT_ARGS+=(--budget-s $(( left > 120 ? left : 120 )))
fi
"$PYTHON" benchmarks/report.py ${REPORT_ARGS[@]+"${REPORT_ARGS[@]}"} --out "$OUT" 2>&1 | tee "$OUT/report.log" || status=1
echo "gpu.sh: done in $(( $(date +%s) - start )) s, outputs in $OUT (status $status)"
exit $status
