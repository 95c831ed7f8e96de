"""rms_norm (+ residual, per-head), apply_rotary and silu_and_mul against their references and float64."""
import pytest
import torch

from kernel_test_utils import DEVICE, assert_close, assert_same_rounding, poison, randn
from rstitch_engine.kernels import (apply_rotary, apply_rotary_ref, rms_norm, rms_norm_ref, silu_and_mul,
                                    silu_and_mul_ref)

DTYPES = [torch.float32, torch.bfloat16]


def rms_norm_fp64(x, weight, eps, residual=None):
    r = x if residual is None else (x.double() + residual.double()).to(x.dtype)
    r = r.double()
    return r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("n_rows, hidden", [(1, 16), (7, 1000), (33, 1536), (3, 3584)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(n_rows, hidden, dtype, with_residual):
    gen = torch.Generator().manual_seed(n_rows * hidden)
    x = randn(n_rows, hidden, dtype=dtype, scale=3.0, generator=gen)
    weight = randn(hidden, dtype=dtype, generator=gen) + 1
    residual = randn(n_rows, hidden, dtype=dtype, generator=gen) if with_residual else None
    eps = 1e-6
    if with_residual:
        out = (poison(torch.empty_like(x)), poison(torch.empty_like(x)))
        got = rms_norm(x, weight, eps, residual=residual, out=out)
        assert got[0] is out[0] and got[1] is out[1]
        ref = rms_norm_ref(x, weight, eps, residual=residual)
        assert_same_rounding(got[1], ref[1])
        normed, ref_normed = got[0], ref[0]
    else:
        normed = poison(torch.empty_like(x))
        assert rms_norm(x, weight, eps, out=normed) is normed
        ref_normed = rms_norm_ref(x, weight, eps)
    assert_close(normed, ref_normed)
    assert_close(normed, rms_norm_fp64(x, weight, eps, residual))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head(dtype):
    """Qwen3 q-norm: q heads of a fused qkv output viewed as [T * heads, head_dim]."""
    tokens, heads, head_dim = 5, 4, 128
    gen = torch.Generator().manual_seed(1)
    qkv = randn(tokens, (heads + 2) * head_dim, dtype=dtype, generator=gen)
    q = qkv[:, :heads * head_dim].reshape(tokens * heads, head_dim)
    weight = randn(head_dim, dtype=dtype, generator=gen)
    normed = rms_norm(q, weight, 1e-6)
    assert_close(normed, rms_norm_ref(q, weight, 1e-6))
    assert_close(normed, rms_norm_fp64(q, weight, 1e-6))


def rope_cache(max_pos, head_dim, dtype=torch.float32, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype=dtype, device=DEVICE)


def rotate_half_fp64(x, cos, sin):
    """HF Llama/Qwen2 style: x * cos + rotate_half(x) * sin, in float64."""
    x = x.double()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * torch.cat([cos, cos], -1) + rotated * torch.cat([sin, sin], -1)


@pytest.mark.parametrize("tokens, num_q_heads, num_kv_heads, head_dim", [
    (1, 4, 1, 16), (5, 7, 1, 64), (33, 12, 2, 128), (9, 28, 4, 128)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary(tokens, num_q_heads, num_kv_heads, head_dim, dtype):
    gen = torch.Generator().manual_seed(tokens * head_dim)
    qkv = randn(tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, generator=gen)
    q = qkv[:, :num_q_heads * head_dim].view(tokens, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim:(num_q_heads + num_kv_heads) * head_dim].view(tokens, num_kv_heads, head_dim)
    v_before = qkv[:, (num_q_heads + num_kv_heads) * head_dim:].clone()
    cache = rope_cache(4096, head_dim)
    positions = torch.randint(0, 4096, (tokens,), generator=gen, dtype=torch.int32).to(DEVICE)
    q_ref, k_ref = q.clone(), k.clone()
    cos, sin = cache[positions.long()].double()[:, None, :].chunk(2, dim=-1)
    q_fp64, k_fp64 = rotate_half_fp64(q, cos, sin), rotate_half_fp64(k, cos, sin)
    apply_rotary(q, k, positions, cache)
    apply_rotary_ref(q_ref, k_ref, positions, cache)
    assert_close(q, q_ref)
    assert_close(k, k_ref)
    assert_close(q, q_fp64, dtype)
    assert_close(k, k_fp64, dtype)
    assert torch.equal(qkv[:, (num_q_heads + num_kv_heads) * head_dim:], v_before)  # V untouched


@pytest.mark.parametrize("tokens, inter", [(1, 16), (7, 1000), (32, 1536), (3, 4864)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(tokens, inter, dtype):
    x = randn(tokens, 2 * inter, dtype=dtype, scale=2.0, generator=torch.Generator().manual_seed(inter))
    out = poison(torch.empty(tokens, inter, dtype=dtype, device=DEVICE))
    assert silu_and_mul(x, out=out) is out
    assert_close(out, silu_and_mul_ref(x))
    gate, up = x.double().chunk(2, dim=-1)
    assert_close(out, torch.nn.functional.silu(gate) * up, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [1, 32, 256])
@pytest.mark.parametrize("hidden, inter", [(1536, 8960), (3584, 18944)])
def test_elementwise_real_shapes_cuda(tokens, hidden, inter):
    gen = torch.Generator().manual_seed(tokens)
    dtype = torch.bfloat16
    x, residual = randn(tokens, hidden, dtype=dtype, generator=gen), randn(tokens, hidden, dtype=dtype, generator=gen)
    weight = randn(hidden, dtype=dtype, generator=gen)
    got, ref = rms_norm(x, weight, 1e-6, residual=residual), rms_norm_ref(x, weight, 1e-6, residual=residual)
    assert_close(got[0], ref[0])
    assert torch.equal(got[1], ref[1])
    act = randn(tokens, 2 * inter, dtype=dtype, generator=gen)
    assert_close(silu_and_mul(act), silu_and_mul_ref(act))
