#!/usr/bin/env bash
# Every GPU figure of the README's "Measured performance" table in one or two device calls.
#
# The device machine (an H200 image with CUDA PyTorch, Triton, transformers, accelerate, onnx,
# pytest) lacks aihwkit and holds another transformers than hetmap pins. Here, once:
#
#     make gpu-wheels          # .whl/: aihwkit 1.1.0 and transformers for Python 3.12 (27 MB)
#
# then, with the device tool (each call under its 10-minute limit; STEPS picks the steps):
#
#     run(command="bash benchmarks/gpu_run.sh tests layer programming overhead",
#         carry=[".whl"], timeout_s=590)
#     run(command="bash benchmarks/gpu_run.sh check", carry=[".whl"], timeout_s=590)
#
# Steps (rough H200 times): tests (the CUDA tests, 1 min), layer (gpu_layer.py, 2-3 min),
# programming (programming_speed.py --device cuda, 1 min), overhead (simulator_overhead.py
# --device cuda, 1 min), check (gpu_check.py, about 5 min). Each step's JSON lands in $OUT
# (copy it to benchmarks/results/ and run benchmarks/performance_table.py --readme); the
# steps' output goes to $OUT/gpu_run.log. Locally, for the script itself:
#     PY=$PWD/.venv/bin/python SKIP_INSTALL=1 DEVICE=cpu bash benchmarks/gpu_run.sh tests programming
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-/tmp/hetmap-gpu-run}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
export PYTHONUNBUFFERED=1

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "error: no .whl/ here: run 'make gpu-wheels' and carry .whl"; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 2
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
        --no-cache-dir --target /tmp/site . || exit 2
    export PYTHONPATH=/tmp/site
fi
# Run from outside the checkout: its hetmap/ folder would shadow the installed package (whose
# hetmap.compiler lives in compiler/) wherever the working directory leads sys.path.
cd /tmp
"$PY" -c "import torch, transformers, hetmap.runtime; print('torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" | tee -a "$LOG" || exit 2

step() {  # name, seconds allowed, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local code=$?
    echo "== $name: exit $code after $((SECONDS - start)) s" | tee -a "$LOG"
    tail -n 3 "$LOG" | grep -v "^== " || true
}

[ $# -gt 0 ] || set -- tests layer programming overhead check
for name in "$@"; do
    case $name in
        tests) step tests 240 "$PY" -m pytest -q -p no:cacheprovider -k "cuda or compiled" \
            "$REPO/tests/runtime/test_sim_fused.py" "$REPO/tests/runtime/test_sim_tiles.py" ;;
        layer) step layer 300 "$PY" "$REPO/benchmarks/gpu_layer.py" --device "$DEVICE" \
            --output "$OUT/gpu_layer.json" ;;
        programming) step programming 240 "$PY" "$REPO/benchmarks/programming_speed.py" \
            --device "$DEVICE" --repeats 5 --output "$OUT/programming_speed_$DEVICE.json" ;;
        overhead) step overhead 240 "$PY" "$REPO/benchmarks/simulator_overhead.py" --device "$DEVICE" \
            --repeats 9 --output "$OUT/simulator_overhead_$DEVICE.json" ;;
        check) step check 560 "$PY" "$REPO/benchmarks/gpu_check.py" --device "$DEVICE" \
            --output "$OUT/gpu_check.json" ;;
        *) echo "error: unknown step '$name' (tests, layer, programming, overhead, check)"; exit 2 ;;
    esac
done
