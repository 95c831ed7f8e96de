"""Rotary embedding and the KV-cache store in one kernel: q rotated in place; k rotated and written,
with v, straight into the paged pool at slot_mapping (slot -1: padding, nothing stored; its q is still
rotated). k itself is left unchanged.

Conventions of rotary.py (NeoX rotate_half; cos_sin_cache [max_pos, D] = [cos | sin]; float32 math) and
kv_store.py (pool [num_blocks, block_size, Hkv, D]). q [T, Hq, D], k and v [T, Hkv, D]: any token/head
strides (views into the packed qkv projection output), unit last stride. One program per token.

With `nonfinite=(token_slot [T], nonfinite_slots [slots])` (int32) a token that stores KV (padding tokens,
slot -1, are not checked) and whose q, k or v holds a NaN or an inf sets nonfinite_slots[token_slot[t]] = 1: the model runner's NaN detection, which must not depend on
what attention makes of a NaN (rstitch_kernels/stitch_step.py reads the flags). Every writer writes 1, so the
programs need no ordering; the flags are cleared where a request's KV is rebuilt (rstitch_kernels/embedding.py).
"""
import torch
import triton
import triton.language as tl

from .kv_store import store_kv_ref
from .rotary import _rotate_heads, apply_rotary_ref, count_nonfinite


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                       num_q_heads, num_kv_heads, q_stride_t, q_stride_h, k_stride_t, k_stride_h,
                       v_stride_t, v_stride_h, cache_stride, stride_block, stride_offset, stride_head,
                       token_slot_ptr, nonfinite_slots_ptr, Q_HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
                       HALF: tl.constexpr, PAGE: tl.constexpr, CHECK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, HALF)[None, :]
    cos_ptr = cos_sin_ptr + tl.load(positions_ptr + token).to(tl.int64) * cache_stride + dims
    cos = tl.load(cos_ptr).to(tl.float32)
    sin = tl.load(cos_ptr + HALF).to(tl.float32)
    bad = _rotate_heads(q_ptr + token * q_stride_t, q_stride_h, num_q_heads, cos, sin, Q_HEADS_PAD, HALF)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, KV_HEADS_PAD)[:, None]
        mask = heads < num_kv_heads
        dst = (slot // PAGE) * stride_block + (slot % PAGE) * stride_offset + heads * stride_head + dims
        key = k_ptr + token * k_stride_t + heads * k_stride_h + dims
        k1 = tl.load(key, mask=mask).to(tl.float32)
        k2 = tl.load(key + HALF, mask=mask).to(tl.float32)
        tl.store(k_cache_ptr + dst, (k1 * cos - k2 * sin).to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(k_cache_ptr + dst + HALF, (k2 * cos + k1 * sin).to(k_cache_ptr.dtype.element_ty), mask=mask)
        value = v_ptr + token * v_stride_t + heads * v_stride_h + dims
        v1 = tl.load(value, mask=mask)
        v2 = tl.load(value + HALF, mask=mask)
        tl.store(v_cache_ptr + dst, v1, mask=mask)
        tl.store(v_cache_ptr + dst + HALF, v2, mask=mask)
        if CHECK:
            bad += count_nonfinite(k1, mask) + count_nonfinite(k2, mask)
            bad += count_nonfinite(v1.to(tl.float32), mask) + count_nonfinite(v2.to(tl.float32), mask)
            tl.store(nonfinite_slots_ptr + tl.load(token_slot_ptr + token), 1, mask=bad > 0)


def rope_store(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, nonfinite=None):
    """Rotates q in place and stores rotated k and v at slot_mapping; returns q. `nonfinite`: see above."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and v.dtype == v_cache.dtype
    if num_tokens == 0:
        return q
    token_slot, nonfinite_slots = nonfinite if nonfinite is not None else (slot_mapping, slot_mapping)
    _rope_store_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, num_q_heads, num_kv_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), token_slot, nonfinite_slots,
        Q_HEADS_PAD=triton.next_power_of_2(num_q_heads), KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HALF=head_dim // 2, PAGE=k_cache.shape[1], CHECK=nonfinite is not None, num_warps=4)
    return q


def rope_store_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, nonfinite=None):
    """Plain torch: apply_rotary_ref on q and a copy of k, then store_kv_ref; the same `nonfinite` marks."""
    if nonfinite is not None:
        token_slot, nonfinite_slots = nonfinite
        finite = lambda x: torch.isfinite(x.reshape(x.shape[0], -1)).all(1)  # noqa: E731
        bad = ((slot_mapping >= 0) & ~(finite(q) & finite(k) & finite(v))).int()  # padding tokens: not checked
        nonfinite_slots.scatter_reduce_(0, token_slot.long(), bad, reduce="amax")
    k = k.clone()
    apply_rotary_ref(q, k, positions, cos_sin_cache)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    return q
