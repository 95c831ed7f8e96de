#!/usr/bin/env bash
# A lent GPU (H100) session in three calls of the device tool, each under its 10-minute limit; a stage
# builds first when the machine is fresh (offline: the image has torch, triton, pybind11, cmake).
#   bash bench/gpu_session.sh tests     # build + the CUDA tests                      (~7 min at most)
#   bash bench/gpu_session.sh kernels   # bench/kernels.py table + pytest-benchmark    (~9 min at most)
#   bash bench/gpu_session.sh e2e       # bench/e2e.py: the issue-5 end-to-end table  (~9 min at most)
# Extra arguments go to the benchmark (e.g. --quick). Results land in bench/results/ and are copied to
# $OUT with the stage's log.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: bash bench/gpu_session.sh tests|kernels|e2e [benchmark args]}
shift
case "$stage" in tests|kernels|e2e) ;; *) echo "unknown stage $stage: tests, kernels or e2e"; exit 2 ;; esac
OUT=${OUT:-bench/results}
mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  # no registry on the device: no build isolation, no dependency resolution
  python -c "import rstitch_engine._C" 2>/dev/null ||
    python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
  case "$stage" in
    tests)   timeout 420 python -m pytest tests -q -m cuda -p no:cacheprovider 2>&1 | tail -40 ;;
    kernels) timeout 330 python bench/kernels.py "$@" 2>&1 | tail -60
             timeout 200 python -m pytest bench/test_kernels_bench.py -q -p no:cacheprovider \
               --benchmark-group-by=group --benchmark-json="$OUT/kernels-pytest-benchmark.json" 2>&1 | tail -60 ;;
    e2e)     timeout 560 python bench/e2e.py "$@" 2>&1 | tail -120 ;;
  esac
} 2>&1 | tee "$OUT/$stage.log"
for pattern in kernels-*.json kernels-*.md e2e-*.json e2e-*.md e2e-*-share.png e2e-*-batch.png; do
  case "$pattern" in "$stage"-*) ;; *) continue ;; esac
  newest=$(ls -t bench/results/$pattern 2>/dev/null | head -1)
  [ -n "$newest" ] && cp "$newest" "$OUT/"
done
exit 0
