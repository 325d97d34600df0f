#!/usr/bin/env bash
# Run every benchmark on one GPU machine and leave all outputs in one folder.
#
#   bash benchmarks/gpu.sh OUT_DIR [--quick] [more report.py options]
#
# Needs only the preinstalled jax/diffrax/equinox (and torch + torchdiffeq, optional):
# the repository is put on PYTHONPATH, nothing is installed. Everything ends within
# TOTAL_S seconds (default 480: 8 minutes on one H100/H200):
#
# 1. report.py, with REPORT_S seconds (default 300) as its --budget-s: it cuts its plan
#    to that budget by its own estimate before it starts, prints the plan and the
#    estimate (also here, first), and lists whatever it planned and did not measure.
#    Its phases never share the device: compiling and errors, interleaved timings,
#    torchdiffeq, then device peaks in fresh processes, one at a time.
# 2. then, while time is left, cnf_tabular.py (the MINIBOONE-shaped CNF), checkpoints.py,
#    speed.py, time_to_target.py and modes.py (80 s on an H200): each is stopped when
#    TOTAL_S is reached, and gpu.log records which finished, which were stopped and
#    which did not start.
#
# Without a GPU it warns and runs the --quick sizes instead (TOTAL_S then defaults to
# 1200: report.py's quick run and the quick sizes of the rest, on 2 CPU cores).
set -u -o pipefail
OUT=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [--quick]}
shift
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
start=$(date +%s)
log() { echo "gpu.sh: $*" | tee -a "$OUT/gpu.log"; }

backend=$("$PYTHON" -c "import jax; print(jax.default_backend())" 2>/dev/null | tail -n 1)
REPORT_ARGS=("$@")
QUICK_ARGS=()
if [[ " ${REPORT_ARGS[*]-} " == *" --quick "* ]]; then
    QUICK_ARGS+=(--quick)
elif [ "$backend" != "gpu" ]; then
    log "no GPU (JAX backend: ${backend:-unknown}); running the --quick sizes."
    REPORT_ARGS+=(--quick)
    QUICK_ARGS+=(--quick)
fi
if [ ${#QUICK_ARGS[@]} = 0 ]; then  # the GPU sizes: 8 minutes in all
    TOTAL_S=${TOTAL_S:-480}
    if [[ " ${REPORT_ARGS[*]-} " != *" --budget-s "* ]]; then
        REPORT_ARGS+=(--budget-s "${REPORT_S:-300}")
    fi
else  # --quick, on a CPU: report.py's own budget, and time for the rest
    TOTAL_S=${TOTAL_S:-1200}
fi
{
    echo "backend: $backend"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    "$PYTHON" --version
} > "$OUT/device.txt" 2>&1

log "plan: report.py ${REPORT_ARGS[*]}, then as far as time allows cnf_tabular.py," \
    "checkpoints.py, speed.py, time_to_target.py and modes.py ${QUICK_ARGS[*]-};" \
    "everything stops at ${TOTAL_S} s"
"$PYTHON" benchmarks/report.py ${REPORT_ARGS[@]+"${REPORT_ARGS[@]}"} --plan 2>&1 | tee -a "$OUT/gpu.log"

status=0
left() { echo $(( TOTAL_S - ($(date +%s) - start) )); }
step() {  # step NAME LOG COMMAND...: run COMMAND until TOTAL_S, teeing to LOG
    local name=$1 logfile=$2 rc
    shift 2
    if [ "$(left)" -le 5 ]; then
        log "$name: not run, no time left of ${TOTAL_S} s"
        status=1
        return
    fi
    timeout "$(left)" "$@" 2>&1 | tee "$OUT/$logfile"
    rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ]; then
        log "$name: stopped at ${TOTAL_S} s, not finished"
    elif [ "$rc" != 0 ]; then
        log "$name: failed (exit $rc)"
    else
        log "$name: done at $(( $(date +%s) - start )) s"
        return
    fi
    status=1
}
step report.py report.log "$PYTHON" benchmarks/report.py ${REPORT_ARGS[@]+"${REPORT_ARGS[@]}"} --out "$OUT"
step cnf_tabular.py cnf_tabular.log "$PYTHON" benchmarks/cnf_tabular.py ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"} --out "$OUT"
step checkpoints.py checkpoints.log "$PYTHON" benchmarks/checkpoints.py ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"} --out "$OUT"
step speed.py speed.log "$PYTHON" benchmarks/speed.py ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"} --json "$OUT/speed.json"
step time_to_target.py time_to_target.log "$PYTHON" benchmarks/time_to_target.py ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"} --out "$OUT"
step modes.py modes.log "$PYTHON" benchmarks/modes.py ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"} --out "$OUT"
log "done in $(( $(date +%s) - start )) s, outputs in $OUT (status $status)"
exit $status
