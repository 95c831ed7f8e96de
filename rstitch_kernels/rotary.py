"""Rotary position embedding, NeoX / rotate_half style (HF Llama, Qwen2): dims (i, i + D/2) rotate as a pair.

cos_sin_cache [max_pos, D]: first D/2 columns cos, last D/2 sin. q [T, Hq, D] and k [T, Hkv, D] are
rotated in place (any token/head strides, unit last stride), math in float32.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def count_nonfinite(x, mask):
    """How many of the unmasked elements of x are NaN or +-inf."""
    return tl.sum(tl.sum(tl.where(mask & ((x != x) | (tl.abs(x) == float("inf"))), 1, 0), axis=1), axis=0)


@triton.jit
def _rotate_heads(ptr, stride_head, num_heads, cos, sin, HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
    """Rotates the heads in place; returns how many of their inputs were not finite."""
    heads = tl.arange(0, HEADS_PAD)[:, None]
    mask = heads < num_heads
    first = ptr + heads * stride_head + tl.arange(0, HALF)[None, :]
    x1 = tl.load(first, mask=mask).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(ptr.dtype.element_ty), mask=mask)
    return count_nonfinite(x1, mask) + count_nonfinite(x2, mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, positions_ptr, cos_sin_ptr, num_q_heads, num_kv_heads,
                   q_stride_t, q_stride_h, k_stride_t, k_stride_h, cache_stride,
                   Q_HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cos_ptr = cos_sin_ptr + tl.load(positions_ptr + token).to(tl.int64) * cache_stride + tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_ptr).to(tl.float32)
    sin = tl.load(cos_ptr + HALF).to(tl.float32)
    _rotate_heads(q_ptr + token * q_stride_t, q_stride_h, num_q_heads, cos, sin, Q_HEADS_PAD, HALF)
    _rotate_heads(k_ptr + token * k_stride_t, k_stride_h, num_kv_heads, cos, sin, KV_HEADS_PAD, HALF)


def apply_rotary(q, k, positions, cos_sin_cache) -> None:
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    if num_tokens == 0:
        return
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache, num_q_heads, num_kv_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        Q_HEADS_PAD=triton.next_power_of_2(num_q_heads), KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HALF=head_dim // 2, num_warps=4)


def apply_rotary_ref(q, k, positions, cos_sin_cache) -> None:
    half = q.shape[-1] // 2
    cos, sin = cos_sin_cache[positions.long()].float()[:, None, :].split(half, dim=-1)
    for x in (q, k):
        x1, x2 = x.float().split(half, dim=-1)
        x.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
