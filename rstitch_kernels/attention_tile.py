"""Pieces both paged-attention kernels share: a K/V tile gathered through the block table, and one
online-softmax step (base-2: scores arrive pre-multiplied by scale * log2(e)).

KV pool per layer: [num_blocks, block_size, num_kv_heads, head_dim]; token t of a sequence lives in
block block_table[t // block_size] at offset t % block_size.

Tiles are HEAD_PAD = head_pad(head_dim) wide: a power of two (tl.arange) of at least 16 (tl.dot's K on
sm_90), with the columns past HEAD_DIM masked to zero, so head dims such as 8 (tiny test models) or 80 work.
"""
import triton
import triton.language as tl

from .common import dot

LOG2E = 1.4426950408889634


def head_pad(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))
NEG_BIG = tl.constexpr(-1.0e30)  # finite running-max start: a fully masked tile gives exp2(-inf) = 0, not NaN


@triton.jit
def kv_tile_offsets(block_table_row_ptr, tokens, token_mask, kv_head, stride_block, stride_offset, stride_head,
                    PAGE: tl.constexpr, HEAD_PAD: tl.constexpr):
    """[N, HEAD_PAD] element offsets of `tokens` (masked ones point at block 0) for one kv head."""
    block = tl.load(block_table_row_ptr + tokens // PAGE, mask=token_mask, other=0).to(tl.int64)
    row = block * stride_block + (tokens % PAGE) * stride_offset + kv_head * stride_head
    return row[:, None] + tl.arange(0, HEAD_PAD)[None, :]


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
                 CAUSAL: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Attend q [M, D] to keys [key_begin, key_end) of one sequence; with CAUSAL, query i only sees
    keys at positions <= q_pos[i]. Returns (m, l, acc) for the caller to normalise or combine."""
    m = tl.full([q.shape[0]], NEG_BIG, tl.float32)
    l = tl.zeros([q.shape[0]], tl.float32)
    acc = tl.zeros([q.shape[0], HEAD_PAD], tl.float32)
    dim_mask = tl.arange(0, HEAD_PAD) < HEAD_DIM
    for start in range(key_begin, key_end, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        token_mask = tokens < key_end
        offsets = kv_tile_offsets(block_table_row_ptr, tokens, token_mask, kv_head,
                                  stride_block, stride_offset, stride_head, PAGE, HEAD_PAD)
        kv_mask = token_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=kv_mask, other=0.0)
        valid = token_mask[None, :]
        if CAUSAL:
            valid = valid & (tokens[None, :] <= q_pos[:, None])
        m, l, acc = online_softmax_step(q, k, v, valid, m, l, acc, scale_log2e)
    return m, l, acc
