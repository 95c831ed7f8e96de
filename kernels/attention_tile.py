"""Pieces both paged-attention kernels share: a K/V tile gathered through the block table, and one
online-softmax step (base-2: scores arrive pre-multiplied by scale * log2(e)).

KV pool per layer: [num_blocks, block_size, num_kv_heads, head_dim]; token t of a sequence lives in
block block_table[t // block_size] at offset t % block_size.
"""
import triton
import triton.language as tl

from .common import dot

LOG2E = 1.4426950408889634
NEG_BIG = tl.constexpr(-1.0e30)  # finite running-max start: a fully masked tile gives exp2(-inf) = 0, not NaN


@triton.jit
def kv_tile_offsets(block_table_row_ptr, tokens, token_mask, kv_head, stride_block, stride_offset, stride_head,
                    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """[N, HEAD_DIM] element offsets of `tokens` (masked ones point at block 0) for one kv head."""
    block = tl.load(block_table_row_ptr + tokens // PAGE, mask=token_mask, other=0).to(tl.int64)
    row = block * stride_block + (tokens % PAGE) * stride_offset + kv_head * stride_head
    return row[:, None] + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def online_softmax_step(q, k, v, valid, m, l, acc, scale_log2e):
    """Fold one tile into the running (max m [M], sum l [M], unnormalised output acc [M, D]).
    q [M, D], k and v [N, D], valid [M, N]."""
    s = dot(q, tl.trans(k)) * scale_log2e
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v)
    return m_new, l, acc


@triton.jit
def attend_paged(q, k_cache_ptr, v_cache_ptr, block_table_row_ptr, key_begin, key_end, q_pos, kv_head,
                 stride_block, stride_offset, stride_head, scale_log2e,
                 CAUSAL: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Attend q [M, D] to keys [key_begin, key_end) of one sequence; with CAUSAL, query i only sees
    keys at positions <= q_pos[i]. Returns (m, l, acc) for the caller to normalise or combine."""
    m = tl.full([q.shape[0]], NEG_BIG, tl.float32)
    l = tl.zeros([q.shape[0]], tl.float32)
    acc = tl.zeros([q.shape[0], HEAD_DIM], tl.float32)
    for start in range(key_begin, key_end, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        token_mask = tokens < key_end
        offsets = kv_tile_offsets(block_table_row_ptr, tokens, token_mask, kv_head,
                                  stride_block, stride_offset, stride_head, PAGE, HEAD_DIM)
        k = tl.load(k_cache_ptr + offsets, mask=token_mask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=token_mask[:, None], other=0.0)
        valid = token_mask[None, :]
        if CAUSAL:
            valid = valid & (tokens[None, :] <= q_pos[:, None])
        m, l, acc = online_softmax_step(q, k, v, valid, m, l, acc, scale_log2e)
    return m, l, acc
