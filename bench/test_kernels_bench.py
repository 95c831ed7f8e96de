"""pytest-benchmark timings of the kernels and their torch versions (CUDA only; skipped without it).

    python -m pytest bench/test_kernels_bench.py --benchmark-group-by=group
Wall-clock per call including launch and a device sync; bench/kernel_micro.py gives the device-side
numbers (CUDA graphs, bandwidth). Cases come from bench/kernel_micro.py.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).with_name("kernel_micro.py"))
bench_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_kernels)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CASES = [*bench_kernels.stitch_cases([1, 64, 256], sampled=False),
         *bench_kernels.stitch_cases([1, 256], sampled=True),
         *bench_kernels.decode_cases([1024, 8192], [(28, 4), (12, 2)]),
         *bench_kernels.elementwise_cases([1, 32, 256]),
         *bench_kernels.fused_cases([1, 4, 8, 16]),
         *bench_kernels.decode_layer_cases([1, 8])]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c['name']}[{c['shape']}]" for c in CASES])
def test_kernel_speed(benchmark, case, impl):
    inputs = case["build"](0)
    op = case[impl]

    def call():
        op(inputs)
        torch.cuda.synchronize()

    call()  # compile / warm up outside the timing
    benchmark.group = f"{case['name']} {case['shape']}"
    benchmark.extra_info.update(bytes=case["bytes"], impl=impl)
    benchmark(call)
