"""Write new tokens' K/V into the paged pool: cache[slot // block_size, slot % block_size] = key/value.

Pool per layer: [num_blocks, block_size, num_kv_heads, head_dim]; slot -1 marks padding (skipped).
One program per token moves its [Hkv, D] key and value tiles.
"""
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, num_heads,
                     key_stride_t, key_stride_h, value_stride_t, value_stride_h,
                     stride_block, stride_offset, stride_head,
                     PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HEAD_DIM)[None, :]
    mask = heads < num_heads
    dst = (slot // PAGE) * stride_block + (slot % PAGE) * stride_offset + heads * stride_head + dims
    key = tl.load(key_ptr + token * key_stride_t + heads * key_stride_h + dims, mask=mask)
    value = tl.load(value_ptr + token * value_stride_t + heads * value_stride_h + dims, mask=mask)
    tl.store(k_cache_ptr + dst, key, mask=mask)
    tl.store(v_cache_ptr + dst, value, mask=mask)


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    """key/value [T, Hkv, D] (any token/head strides, unit last stride) into the pools, in place."""
    num_tokens, num_heads, head_dim = key.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert key.stride(-1) == 1 and value.stride(-1) == 1 and key.dtype == k_cache.dtype
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, num_heads,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        PAGE=k_cache.shape[1], HEAD_DIM=head_dim, HEADS_PAD=triton.next_power_of_2(num_heads), num_warps=4)


def store_kv_ref(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Plain torch; boolean indexing syncs, which the CPU runtime this serves does not mind."""
    write = slot_mapping >= 0
    slots = slot_mapping[write].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key[write]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value[write]
