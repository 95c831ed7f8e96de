#!/usr/bin/env bash
# The one GPU check (issues 15, 24), made for a lent GPU whose first call is in practice its only one.
#   bash bench/gpu_check.sh                 # on the GPU machine (OUT defaults to bench/results/gpu-check-<date>)
#   bash bench/gpu_check.sh --with-tests    # also the CUDA tests (120 s more: worst case 590 s, so only once
#                                           # a first call has shown the other stages end well inside theirs)
#   bash bench/gpu_check.sh --dry           # the same stages on the CPU at tiny shapes (run by CI)
# Budget on a bare H200: worst case 470 s, the sum of the stage limits (build 60; warm 120, in the background
# beside env 15 and smoke 45; graphs 120; tput 110; micro 60) plus a few seconds of packing, inside a
# 600 s device call; expected about 5 minutes (the first engine compiles ~45 Triton specialisations at
# 1-2 s each; the later ones find them in Triton's disk cache). Stages run in order, each its own process
# under `timeout`, fail-soft: a crash or a timeout leaves the other stages' results.
# What comes back: the device returns at most 8 files from $OUT (16 MiB each, at most 2 folders down), so
# $OUT holds only facts.jsonl (one JSON line per fact, "status": PASS | FAIL | ERROR | SKIP where it is a
# check), logs.tar.gz (nvidia-smi and every stage's log, re-packed after each stage, so a call killed at
# its limit still returns them) and micro's kernels-*.json and .md. facts.jsonl is printed at the end too:
# the call's output tail comes back even when its files do not.
# No registry on the device: pip never resolves or downloads (--no-index, no build isolation); when pip
# cannot build, CMake (Ninja where make is absent) builds _C and $BUILD_DIR/pythonpath maps the three
# source folders into one importable package (GPU_CHECK_BUILD=cmake forces that path; the dry test does).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY="" TESTS=""
for arg in "$@"; do
  case $arg in
    --dry) DRY="--dry"; export TRITON_INTERPRET=1 ;;
    --with-tests) TESTS=1 ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry] [--with-tests]" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-bench/results/gpu-check-$(date -u +%Y-%m-%d-%H%M)}
BUILD_DIR=${BUILD_DIR:-build/gpu-check}
mkdir -p "$OUT" "$BUILD_DIR"
OUT=$(cd "$OUT" && pwd) BUILD_DIR=$(cd "$BUILD_DIR" && pwd)
LOGS=$(mktemp -d)  # outside $OUT: only the archive of it travels back
trap 'rm -rf "$LOGS"' EXIT
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# the interpreter on a small CPU shared with the rest of the suite: more time for the same tiny work
# (tput took 284 s of its 440 alone, and ran out at 440 beside two other test processes)
SCALE=1; [ -n "$DRY" ] && SCALE=6

pack() {  # tar's 1: a log still being written (the background warm stage): packed as it was
  tar --warning=no-file-changed -czf "$OUT/logs.tar.gz.tmp" -C "$LOGS" .
  [ $? -le 1 ] && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
  rm -f "$OUT/logs.tar.gz.tmp"
}

exit_fact() {  # stage, rc, seconds, limit
  local status=PASS; [ "$2" -ne 0 ] && status=ERROR
  echo "{\"stage\": \"$1\", \"name\": \"exit\", \"rc\": $2, \"seconds\": $3, \"limit_s\": $4, \"status\": \"$status\"}" \
    >> "$OUT/facts.jsonl"
  echo "== $1: rc=$2 ($3 s of $4)"
  tail -n 3 "$LOGS/$1.log"
  pack
}

stage() {  # name, seconds on the GPU, command...
  local name=$1 limit=$(( $2 * SCALE )) start
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  exit_fact "$name" $? $(( $(date +%s) - start )) "$limit"
}

build() {
  rm -rf "$BUILD_DIR/pythonpath"
  "$PY" --version
  "$PY" -c "import setuptools, pybind11; print('setuptools', setuptools.__version__, 'pybind11', pybind11.__version__)"
  if [ "${GPU_CHECK_BUILD:-pip}" != cmake ]; then
    # always built: an extension left from an earlier tree would pass an import and fail every stage after
    "$PY" -m pip install -q --no-index --disable-pip-version-check --no-build-isolation --no-deps -e . && return 0
    echo "pip could not build: CMake"
  fi
  local generator=(); command -v make > /dev/null || generator=(-G Ninja)
  cmake -S . -B "$BUILD_DIR/cmake" "${generator[@]}" -DPython_EXECUTABLE="$(command -v "$PY")" \
      -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" > /dev/null &&
    cmake --build "$BUILD_DIR/cmake" -j > /dev/null || return 1
  # setup.py's package_dir, as links: python/rstitch_engine/*, engine/ and rstitch_kernels/ in one package
  local pkg=$BUILD_DIR/pythonpath/rstitch_engine entry
  mkdir -p "$pkg"
  for entry in "$ROOT"/python/rstitch_engine/*; do
    case $entry in *.so|*/__pycache__) ;; *) ln -s "$entry" "$pkg/" ;; esac
  done
  ln -s "$ROOT/engine" "$pkg/engine" && ln -s "$ROOT/rstitch_kernels" "$pkg/kernels" && cp "$BUILD_DIR"/cmake/_C*.so "$pkg/" &&
    PYTHONPATH=$BUILD_DIR/pythonpath "$PY" -c "import rstitch_engine as r, rstitch_engine._C, rstitch_engine.engine, \
rstitch_engine.kernels; print('package from', r.__file__)"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"; } \
  > "$LOGS/nvidia-smi.txt"
stage build 60 bash -c "$(declare -f build); ROOT='$ROOT' BUILD_DIR='$BUILD_DIR' PY='$PY' build"
if [ -d "$BUILD_DIR/pythonpath" ]; then export PYTHONPATH=$BUILD_DIR/pythonpath${PYTHONPATH:+:$PYTHONPATH}; fi
CHECK=("$PY" bench/gpu_check.py)
# The first engine compiles every kernel; Triton's disk cache hands them to the later stages' engines.
warm_limit=$(( 120 * SCALE )) warm_start=$(date +%s)
timeout "$warm_limit" "${CHECK[@]}" warm --out "$OUT" $DRY > "$LOGS/warm.log" 2>&1 &
warm_pid=$!
stage env 15 "${CHECK[@]}" env --out "$OUT" $DRY
stage smoke 45 "${CHECK[@]}" smoke --out "$OUT" $DRY
wait "$warm_pid"
exit_fact warm $? $(( $(date +%s) - warm_start )) "$warm_limit"
stage graphs 120 "${CHECK[@]}" graphs --out "$OUT" $DRY
stage tput 110 "${CHECK[@]}" tput --out "$OUT" $DRY
stage micro 60 "${CHECK[@]}" micro --out "$OUT" $DRY
if [ -n "$TESTS" ]; then
  stage pytest-cuda 120 "$PY" -m pytest tests -v -m cuda -n 0 -p no:cacheprovider
fi
echo "== facts.jsonl"
cat "$OUT/facts.jsonl"
echo "facts: $OUT/facts.jsonl ($(grep -c '"status": "FAIL"\|"status": "ERROR"' "$OUT/facts.jsonl") failed); $(ls "$OUT" | wc -l) files in $OUT"
exit 0
