#!/usr/bin/env bash
# The one GPU check (issue 15), for a short lent GPU session: under 8 minutes on a bare H200 if every stage
# runs to its limit (build included), expected ~4. Stages in order, each its own process under `timeout`, fail-soft: a crash or a
# timeout leaves the other stages' results. Every fact is a JSON line in $OUT/facts.jsonl ("status":
# PASS | FAIL | ERROR | SKIP where it is a check); each stage's log is beside it.
#   bash bench/gpu_check.sh          # on the GPU machine (OUT defaults to bench/results/gpu-check-<date>)
#   bash bench/gpu_check.sh --dry    # the same stages on the CPU at tiny shapes (run by CI)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=""
if [ "${1:-}" = "--dry" ]; then DRY="--dry"; export TRITON_INTERPRET=1; fi
OUT=${OUT:-bench/results/gpu-check-$(date -u +%Y-%m-%d-%H%M)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
SCALE=1; [ -n "$DRY" ] && SCALE=4  # the interpreter on a small CPU: more time for the same tiny work

stage() {  # name, seconds on the GPU, command...
  local name=$1 limit=$(( $2 * SCALE )) start rc status
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  status=PASS; [ $rc -ne 0 ] && status=ERROR
  echo "{\"stage\": \"$name\", \"name\": \"exit\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start )), \"limit_s\": $limit, \"status\": \"$status\"}" >> "$OUT/facts.jsonl"
  echo "== $name: rc=$rc ($(( $(date +%s) - start )) s of $limit)"
  tail -n 3 "$OUT/$name.log"
}

build() {  # no registry on the device: no build isolation, no dependency resolution; CMake as the fallback
  "$PY" -c "import rstitch_engine._C" 2>/dev/null && { echo "extension present"; return 0; }
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . && return 0
  cmake -S . -B build/cmake -DPython_EXECUTABLE="$(command -v "$PY")" \
      -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" > /dev/null &&
    cmake --build build/cmake -j > /dev/null &&
    cp build/cmake/_C*.so python/rstitch_engine/ &&
    "$PY" -c "import sys; sys.path.insert(0, 'python'); import rstitch_engine._C"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"; } > "$OUT/nvidia-smi.txt"
stage build 90 bash -c "$(declare -f build); PY=$PY build"
stage env 20 "$PY" bench/gpu_check.py env --out "$OUT" $DRY
stage smoke 45 "$PY" bench/gpu_check.py smoke --out "$OUT" $DRY
stage graphs 100 "$PY" bench/gpu_check.py graphs --out "$OUT" $DRY
stage tput 120 "$PY" bench/gpu_check.py tput --out "$OUT" $DRY
stage micro 45 "$PY" bench/gpu_check.py micro --out "$OUT" $DRY
if [ -z "$DRY" ]; then
  stage pytest-cuda 45 "$PY" -m pytest tests -q -m cuda -n 0 -p no:cacheprovider
fi
echo "facts: $OUT/facts.jsonl ($(grep -c '"status": "FAIL"\|"status": "ERROR"' "$OUT/facts.jsonl") failed)"
exit 0
