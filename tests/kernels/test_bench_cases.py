"""bench/kernel_micro.py's cases built on the CPU at small shapes: every case's inputs, Triton call, torch
baseline and accuracy check run (under the interpreter), so a GPU session never finds a broken case."""
import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "kernel_micro.py"


@pytest.fixture(scope="module")
def bench_kernels():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.DEVICE, module.REAL_MODELS = "cpu", {"tiny": "tiny"}
    return module


def _cases(K):
    return [*K.stitch_cases([1, 3], False), *K.stitch_cases([2], True), *K.decode_cases([48], [(4, 2)], batch=3),
            *K.elementwise_cases([2]), *K.fused_cases([2]), *K.decode_layer_cases([2], context=64, layers=2)]


def test_every_kernel_family_has_a_case(bench_kernels):
    names = {case["name"].split(" ")[0] for case in _cases(bench_kernels)}
    assert names == {"stitch_step", "paged_decode_attention", "rms_norm", "rms_norm+residual", "apply_rotary",
                     "silu_and_mul", "norm_linear", "linear", "silu_mul_linear", "rope_store", "decoder"}


@pytest.mark.slow
def test_cases_run_and_agree_with_their_references(bench_kernels):
    for case in _cases(bench_kernels):
        inputs = case["build"](0)
        case["triton"](inputs)
        case["torch"](inputs)
        if case.get("cublas"):
            case["cublas"](inputs)
        if case["check"] is not None:
            err = case["check"](inputs)
            assert math.isfinite(err) and err < 2e-2, (case["name"], case["shape"], err)
        assert case["bytes"] > 0


def test_sweep_tunes_the_kernel_modules_not_the_reexported_functions(bench_kernels):
    import inspect

    for name, constants in (("stitch_step", ("NUM_WARPS", "NUM_STAGES", "PROGRAMS_PER_SM", "BYTES_PER_THREAD")),
                            ("decode_attention", ("BLOCK_N", "NUM_WARPS", "PROGRAMS_PER_SM")),
                            ("fused_linear", ("BLOCK_N", "BLOCK_K", "NUM_STAGES", "MIN_ROWS"))):
        module = bench_kernels.kernel_module(name)
        assert inspect.ismodule(module) and all(hasattr(module, c) for c in constants), name
