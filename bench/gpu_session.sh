#!/usr/bin/env bash
# Everything a lent GPU (H100) session needs, in one call of about 15-20 minutes:
#   build (offline: the image has torch, triton, pybind11, cmake), the CUDA tests, the kernel benchmarks,
#   the end-to-end benchmark. Results land in bench/results/ and are copied to $OUT (at most 8 files).
# Usage: bash bench/gpu_session.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1
log="$OUT/session.log"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  # no registry on the device: no build isolation, no dependency resolution
  python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
  echo "== CUDA tests"
  timeout 420 python -m pytest tests -q -m cuda -p no:cacheprovider 2>&1 | tail -25
  echo "== kernel benchmarks"
  timeout 300 python bench/kernels.py "$@" 2>&1 | tail -60
  echo "== end-to-end benchmark"
  timeout 600 python bench/e2e.py "$@" 2>&1 | tail -120
} 2>&1 | tee "$log"
for pattern in kernels-*.json kernels-*.md e2e-*.json e2e-*.md e2e-*-share.png e2e-*-batch.png; do
  newest=$(ls -t bench/results/$pattern 2>/dev/null | head -1)
  [ -n "$newest" ] && cp "$newest" "$OUT/"
done
