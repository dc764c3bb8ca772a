#!/usr/bin/env bash
# The GPU check (../shared/GPU.md): measure emakit on one CUDA machine in at most 8 minutes.
#
#   bench/gpu_check.sh [--timm-train PATH] [--out DIR] [--dry-run]
#
#   --timm-train PATH  timm's train.py (not in the timm wheel; bench/README.md says where to get it);
#                      without it the timm runs are recorded as skipped
#   --out DIR          where the JSON and the logs go (default: $OUT if set, else bench/results/gpu_check)
#   --dry-run          the same steps on the CPU at toy sizes (tests/test_gpu_check.py runs this)
#
# Steps, in this order, every figure into DIR/gpu_check.json and every log beside it:
#   1. environment  2. pytest -q -m cuda  3. generated JPEGs (320-px shorter side)
#   4. train img/s, emakit vs timm (resnet50 bf16 channels-last EMA), in-memory input, ViT-B/16 --fsdp
#   5. the EMA update against a step and against the memory-bandwidth floor
# A failing step is recorded and the next one runs; the exit status is the number of failed steps.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PY="${PYTHON:-python3}"
DRY=""
TIMM=""
DEST="${OUT:-$REPO/bench/results/gpu_check}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY="--dry-run"; shift ;;
    --timm-train) TIMM="${2:?--timm-train needs a path}"; shift 2 ;;
    --out) DEST="${2:?--out needs a folder}"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --timm-train PATH, --out DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
if [ -n "$TIMM" ] && [ ! -f "$TIMM" ]; then
  echo "gpu_check.sh: --timm-train $TIMM is not a file: pass timm's train.py (see bench/README.md)" >&2; exit 2
fi
mkdir -p "$DEST" || exit 2
DEST="$(cd "$DEST" && pwd)"
JSON="$DEST/gpu_check.json"
DATA="$DEST/data"
rm -f "$JSON"
cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
failed=0
step() {  # step NAME ARGS...: one gpu_check.py step, its output into DEST/NAME.log
  local name="$1"; shift
  echo "== $name $(date -u +%H:%M:%S)"
  "$PY" "$HERE/gpu_check.py" "$name" --json "$JSON" $DRY "$@" > "$DEST/$name.log" 2>&1 || failed=$((failed + 1))
  tail -n 3 "$DEST/$name.log"
}
start=$(date +%s)
step env
echo "== pytest -m cuda $(date -u +%H:%M:%S)"
if [ -n "$DRY" ]; then  # the CPU: the CUDA tests only collect and skip
  timeout 120 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py > "$DEST/pytest_cuda.log" 2>&1
else
  timeout 200 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/ > "$DEST/pytest_cuda.log" 2>&1
fi
rc=$?
[ $rc -eq 0 ] || failed=$((failed + 1))
tail -n 2 "$DEST/pytest_cuda.log"
step pytest --log "$DEST/pytest_cuda.log" --rc "$rc"
step data --dir "$DATA"
step throughput --dir "$DATA" --logs "$DEST" ${TIMM:+--timm-train "$TIMM"}
step synthetic
step ema
rm -rf "$DATA"
"$PY" - "$JSON" "$(( $(date +%s) - start ))" "$failed" <<'EOF'
import json, sys
path, seconds, failed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
report = json.load(open(path))
report["total_seconds"], report["failed_steps"] = seconds, failed
json.dump(report, open(path, "w"), indent=1)
print(f"gpu_check: {seconds} s, {failed} failed step(s); figures in {path}")
EOF
exit "$failed"
