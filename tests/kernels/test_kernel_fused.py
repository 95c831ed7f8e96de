"""Fused skinny GEMMs (norm_linear, linear, silu_mul_linear) and rope_store against their
references and float64, on odd sizes, with split-K forced and chosen; the fused forward against
transformers; real shapes on CUDA."""
import pytest
import torch

from helpers import engine_logits, hf_logits
from kernel_test_utils import DEVICE, assert_close, assert_same_rounding, poison, randn
from rstitch_engine.engine.ops import FUSED_MAX_ROWS, Ops
from rstitch_engine.kernels.fused_linear import (linear, linear_ref, norm_linear, norm_linear_ref,
                                                 silu_mul_linear, silu_mul_linear_ref)
from rstitch_engine.kernels.rope_store import rope_store, rope_store_ref

DTYPES = [torch.float32, torch.bfloat16]
ROWS = [1, 2, 3, 8, 16]
# (K, N, num_splits): K and N off the block sizes; N=13 is one tile, so the default chooses split-K on the CPU
SHAPES = [(300, 70, None), (1000, 13, None), (777, 129, 3)]
EPS = 1e-6


def poisoned_out(rows, cols, dtype):
    """A poisoned [rows, cols] view of a wider poisoned buffer: unwritten and out-of-range writes show."""
    wide = poison(torch.empty(rows, cols + 5, dtype=dtype, device=DEVICE))
    return wide, wide[:, :cols]


def assert_untouched(wide, cols):
    assert wide[:, cols:].isnan().all(), "wrote past the output columns"


def weights(n, k, dtype, gen):
    return randn(n, k, dtype=dtype, scale=k ** -0.5, generator=gen)


def fp64_rms_norm(h, residual, norm_weight):
    r = h if residual is None else (h.double() + residual.double()).to(h.dtype)
    r = r.double()
    return r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + EPS) * norm_weight.double()


@pytest.mark.parametrize("k, n, splits", SHAPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual, with_bias", [(True, True), (False, False)])
def test_norm_linear(k, n, splits, rows, dtype, with_residual, with_bias):
    gen = torch.Generator().manual_seed(rows * k + n)
    h = randn(rows, k, dtype=dtype, scale=3.0, generator=gen)
    residual = randn(rows, k, dtype=dtype, generator=gen) if with_residual else None
    norm_weight = randn(k, dtype=dtype, generator=gen) + 1
    weight = weights(n, k, dtype, gen)
    bias = randn(n, dtype=dtype, generator=gen) if with_bias else None
    wide, out = poisoned_out(rows, n, dtype)
    y, r = norm_linear(h, residual, norm_weight, weight, bias, EPS, out=out, num_splits=splits)
    y_ref, r_ref = norm_linear_ref(h, residual, norm_weight, weight, bias, EPS)
    assert y is out
    assert_untouched(wide, n)
    if with_residual:
        assert_same_rounding(r, r_ref)
    else:
        assert r is h
    assert_close(y, y_ref)
    y64 = fp64_rms_norm(h, residual, norm_weight) @ weight.double().T
    assert_close(y, y64 + (bias.double() if with_bias else 0), dtype)


@pytest.mark.parametrize("k, n, splits", SHAPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear(k, n, splits, rows, dtype):
    gen = torch.Generator().manual_seed(rows * k + n + 1)
    wide_x = randn(rows, k + 9, dtype=dtype, generator=gen)
    x = wide_x[:, 3:3 + k]  # a strided view, as attention outputs and qkv slices are
    weight = weights(n, k, dtype, gen)
    wide, out = poisoned_out(rows, n, dtype)
    assert linear(x, weight, out=out, num_splits=splits) is out
    assert_untouched(wide, n)
    assert_close(out, linear_ref(x, weight))
    assert_close(out, x.double() @ weight.double().T, dtype)


@pytest.mark.parametrize("k, n, splits", SHAPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_linear(k, n, splits, rows, dtype):
    gen = torch.Generator().manual_seed(rows * k + n + 2)
    gate_up = randn(rows, 2 * k, dtype=dtype, scale=2.0, generator=gen)
    weight = weights(n, k, dtype, gen)
    wide, out = poisoned_out(rows, n, dtype)
    assert silu_mul_linear(gate_up, weight, out=out, num_splits=splits) is out
    assert_untouched(wide, n)
    assert_close(out, silu_mul_linear_ref(gate_up, weight))
    gate, up = gate_up.double().chunk(2, dim=-1)
    assert_close(out, (torch.nn.functional.silu(gate) * up) @ weight.double().T, dtype)


def test_fp16_and_nan_propagation():
    """fp16 runs; a NaN in one input row reaches that row's output only (and fails the error metric)."""
    gen = torch.Generator().manual_seed(5)
    h, residual = randn(3, 200, dtype=torch.float16, generator=gen), randn(3, 200, dtype=torch.float16, generator=gen)
    norm_weight, weight = randn(200, dtype=torch.float16, generator=gen) + 1, weights(50, 200, torch.float16, gen)
    y, _ = norm_linear(h, residual, norm_weight, weight, None, EPS)
    assert_close(y, norm_linear_ref(h, residual, norm_weight, weight, None, EPS)[0])
    h[1, 7] = float("nan")
    y, _ = norm_linear(h, residual, norm_weight, weight, None, EPS, num_splits=2)
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(y, norm_linear_ref(h.nan_to_num(), residual, norm_weight, weight, None, EPS)[0])


@pytest.mark.parametrize("rows", [3, FUSED_MAX_ROWS + 4])
def test_ops_choose_fused_or_unfused(rows):
    """Ops' composite entry points give the references' results below and above the fused threshold."""
    gen = torch.Generator().manual_seed(rows)
    fused, ref = Ops(triton=True), Ops(triton=False)
    h, residual = randn(rows, 96, generator=gen), randn(rows, 96, generator=gen)
    norm_weight = randn(96, generator=gen) + 1
    w_in, w_out = weights(80, 96, torch.float32, gen), weights(96, 40, torch.float32, gen)
    for ops_ in (fused, ref):
        y, r = ops_.norm_linear(h, residual, norm_weight, w_in, None, EPS)
        assert_close(y, norm_linear_ref(h, residual, norm_weight, w_in, None, EPS)[0])
        assert torch.equal(r, h + residual)
        assert_close(ops_.linear(y[:, :40], w_out), linear_ref(y[:, :40], w_out))
        assert_close(ops_.silu_mul_linear(y, w_out), silu_mul_linear_ref(y, w_out))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_fused_forward_matches_transformers(tiny, arch):
    """A short prompt (T <= FUSED_MAX_ROWS) takes the fused kernels in every layer."""
    path = tiny(arch, init_std=0.3, layers=3)
    ids = [5, 17, 200, 9, 31][:FUSED_MAX_ROWS]
    ours = engine_logits(path, ids, triton=True)
    assert (ours - hf_logits(path, ids)).abs().max().item() < 1e-4


# ---------------------------------------------------------------- rope_store


def rope_cache(max_pos, head_dim):
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float().to(DEVICE)


def check_rope_store(tokens, num_q_heads, num_kv_heads, head_dim, page, dtype, num_blocks):
    gen = torch.Generator().manual_seed(tokens * head_dim + num_q_heads)
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(tokens, q_size + 2 * kv_size, dtype=dtype, generator=gen)
    qkv_ref, before = qkv.clone(), qkv.clone()

    def views(t):  # q, k, v: strided views into the packed projection output
        return (t[:, :q_size].view(tokens, num_q_heads, head_dim),
                t[:, q_size:q_size + kv_size].view(tokens, num_kv_heads, head_dim),
                t[:, q_size + kv_size:].view(tokens, num_kv_heads, head_dim))

    k_cache = randn(num_blocks, page, num_kv_heads, head_dim, dtype=dtype, generator=gen)
    v_cache = randn(num_blocks, page, num_kv_heads, head_dim, dtype=dtype, generator=gen)
    slots = torch.randperm(num_blocks * page, generator=gen)[:tokens]
    slots[1::3] = -1  # padding rows
    slot_mapping, positions = slots.int().to(DEVICE), torch.randint(0, 4096, (tokens,), generator=gen).int().to(DEVICE)
    cache = rope_cache(4096, head_dim)
    k_ref_cache, v_ref_cache = k_cache.clone(), v_cache.clone()
    (q, k, v), (q_ref, k_ref, v_ref) = views(qkv), views(qkv_ref)
    assert rope_store(q, k, v, positions, cache, k_cache, v_cache, slot_mapping) is q
    rope_store_ref(q_ref, k_ref, v_ref, positions, cache, k_ref_cache, v_ref_cache, slot_mapping)
    assert torch.equal(qkv[:, q_size:], before[:, q_size:]) and torch.equal(qkv_ref[:, q_size:], before[:, q_size:])
    assert_same_rounding(q, q_ref)
    assert_same_rounding(k_cache, k_ref_cache)  # includes: nothing written for slot -1, nothing else touched
    assert torch.equal(v_cache, v_ref_cache)
    # float64: rotate_half on the rows that were stored
    cos, sin = cache[positions.long()].double()[:, None, :].chunk(2, dim=-1)
    x = views(before)[1].double()
    half = head_dim // 2
    k64 = x * torch.cat([cos, cos], -1) + torch.cat([-x[..., half:], x[..., :half]], -1) * torch.cat([sin, sin], -1)
    stored = slot_mapping >= 0
    assert_close(k_cache.view(-1, num_kv_heads, head_dim)[slot_mapping[stored].long()], k64[stored], dtype)


@pytest.mark.parametrize("tokens, num_q_heads, num_kv_heads, head_dim, page", [
    (1, 4, 1, 16, 8), (5, 7, 1, 64, 4), (9, 12, 2, 128, 16), (4, 28, 4, 128, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_store(tokens, num_q_heads, num_kv_heads, head_dim, page, dtype):
    check_rope_store(tokens, num_q_heads, num_kv_heads, head_dim, page, dtype, num_blocks=-(-tokens // page) + 3)


# ---------------------------------------------------------------- real shapes (CUDA)

REAL = {"1.5B": dict(hidden=1536, qkv=2048, ffn=8960), "7B": dict(hidden=3584, qkv=4608, ffn=18944)}


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 4, 8, 16])
@pytest.mark.parametrize("model", list(REAL))
def test_fused_linear_real_shapes_cuda(model, rows):
    s, dtype = REAL[model], torch.bfloat16
    gen = torch.Generator().manual_seed(rows)
    h = randn(rows, s["hidden"], dtype=dtype, generator=gen)
    residual = randn(rows, s["hidden"], dtype=dtype, generator=gen)
    norm_weight = randn(s["hidden"], dtype=dtype, generator=gen) + 1
    qkv_w, qkv_b = weights(s["qkv"], s["hidden"], dtype, gen), randn(s["qkv"], dtype=dtype, generator=gen)
    gate_up_w, down_w = weights(2 * s["ffn"], s["hidden"], dtype, gen), weights(s["hidden"], s["ffn"], dtype, gen)
    o_w = weights(s["hidden"], s["hidden"], dtype, gen)
    for splits in (None, 4):
        y, r = norm_linear(h, residual, norm_weight, qkv_w, qkv_b, EPS, num_splits=splits)
        y_ref, r_ref = norm_linear_ref(h, residual, norm_weight, qkv_w, qkv_b, EPS)
        assert_close(y, y_ref)
        assert torch.equal(r, r_ref)
        gate_up = norm_linear(r, None, norm_weight, gate_up_w, None, EPS, num_splits=splits)[0]
        assert_close(gate_up, norm_linear_ref(r, None, norm_weight, gate_up_w, None, EPS)[0])
        assert_close(silu_mul_linear(gate_up, down_w, num_splits=splits), silu_mul_linear_ref(gate_up, down_w))
        assert_close(linear(h, o_w, num_splits=splits), linear_ref(h, o_w))


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [1, 16, 256])
@pytest.mark.parametrize("model", list(REAL))
def test_rope_store_real_shapes_cuda(model, tokens):
    num_q_heads, num_kv_heads = (12, 2) if model == "1.5B" else (28, 4)
    check_rope_store(tokens, num_q_heads, num_kv_heads, 128, 16, torch.bfloat16, num_blocks=2048)


# ---------------------------------------------------------------- per-shape GEMV choices


class _RecordingLaunch:
    """Stands in for a kernel: records each launch's grid and constexprs, then launches the real one."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_gemv_configs_choose_the_launch_per_shape(monkeypatch, tmp_path):
    import json

    from rstitch_engine.kernels import fused_linear as FL

    recording = _RecordingLaunch(FL._gemv_kernel)
    monkeypatch.setattr(FL, "_gemv_kernel", recording)
    monkeypatch.setattr(FL, "GEMV_CONFIGS", {})
    path = tmp_path / "gemv.json"
    path.write_text(json.dumps([dict(rows=2, n=70, k=300, dtype="float32", BLOCK_N=32, BLOCK_K=128, NUM_STAGES=3,
                                     SPLITS=3)]))
    assert FL.load_gemv_configs(path) == 1
    gen = torch.Generator().manual_seed(11)
    x, w = randn(2, 300, generator=gen), weights(70, 300, torch.float32, gen)
    assert_close(linear(x, w), linear_ref(x, w))
    assert_close(linear(x[:1], w), linear_ref(x[:1], w))  # 1 row: another shape, the defaults
    (grid, chosen), (_, default) = recording.launches
    assert grid == (3, 3) and (chosen["BLOCK_N"], chosen["BLOCK_K"], chosen["NUM_STAGES"]) == (32, 128, 3)
    assert (default["BLOCK_N"], default["BLOCK_K"]) == (FL.BLOCK_N, FL.BLOCK_K)


@pytest.mark.parametrize("entries, problem", [
    ("{}", "expected a JSON list"), ("[{\"rows\": 1, \"n\": 8}]", "entry 0"),
    ("[{\"rows\": 1, \"n\": 8, \"k\": 8, \"BLOCK_N\": 24}]", "powers of two"),
    ("[{\"rows\": 1, \"n\": 8, \"k\": 8, \"WARPS\": 4}]", "entry 0"), ("[oops", "gemv.json"),
    ("[{\"rows\": 1, \"n\": 8, \"k\": 8, \"BLOCK_K\": 8}]", "blocks >= 16"),
    ("[{\"rows\": 1, \"n\": 8, \"k\": 8, \"SPLITS\": true}]", "entry 0"),
    ("[{\"rows\": 1, \"n\": 8, \"k\": 8, \"dtype\": \"int8\"}]", "dtype")])
def test_gemv_configs_name_the_file_and_the_bad_entry(monkeypatch, tmp_path, entries, problem):
    from rstitch_engine.kernels import fused_linear as FL

    monkeypatch.setattr(FL, "GEMV_CONFIGS", {})
    path = tmp_path / "gemv.json"
    path.write_text(entries)
    with pytest.raises(ValueError, match=problem) as info:
        FL.load_gemv_configs(path)
    assert str(path) in str(info.value) and FL.GEMV_CONFIGS == {}
