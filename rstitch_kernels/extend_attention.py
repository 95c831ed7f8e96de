"""Paged extend attention: several new tokens per row, causal, all K/V read through the block table.

Row r owns q rows query_start_loc[r]..query_start_loc[r+1]; with n of them, new token i sits at
position seq_lens[r] - n + i and sees keys at positions <= its own (its own K/V are already stored).
Serves prompt prefill and the catch-up "extend" when a model takes over.

NOTE: grid (R, cdiv(max_query_len, BLOCK_M), Hq): one program per q head keeps a [BLOCK_M, D] query
tile; the q heads of a GQA group re-read the same K/V tiles, which mostly hit L2. Programs past a
row's new tokens exit at once, so max_query_len only has to bound the rows' lengths.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .attention_tile import LOG2E, attend_paged, head_pad

BLOCK_M = 64
BLOCK_N = 64
NUM_WARPS = 4


@triton.jit
def _extend_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_slot_ptr, query_start_loc_ptr,
                   seq_lens_ptr, out_ptr, scale_log2e,
                   q_stride_t, q_stride_h, out_stride_t, out_stride_h, bt_stride,
                   stride_block, stride_offset, stride_head,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    q_begin = tl.load(query_start_loc_ptr + row)
    n_new = tl.load(query_start_loc_ptr + row + 1) - q_begin
    if tile * BLOCK_M >= n_new:
        return
    seq_len = tl.load(seq_lens_ptr + row)
    new = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    new_mask = new < n_new
    q_pos = seq_len - n_new + new
    dims = tl.arange(0, HEAD_PAD)
    mask = new_mask[:, None] & (dims < HEAD_DIM)[None, :]
    tokens = (q_begin + new).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * q_stride_t + head * q_stride_h + dims[None, :], mask=mask, other=0.0)
    block_table_row = block_tables_ptr + tl.load(seq_slot_ptr + row).to(tl.int64) * bt_stride
    key_end = tl.minimum(seq_len - n_new + (tile + 1) * BLOCK_M, seq_len)  # last query of the tile + 1
    m, l, acc = attend_paged(q, k_cache_ptr, v_cache_ptr, block_table_row, 0, key_end, q_pos, head // GROUP,
                             stride_block, stride_offset, stride_head, scale_log2e,
                             True, PAGE, HEAD_DIM, HEAD_PAD, BLOCK_N)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + tokens[:, None] * out_stride_t + head * out_stride_h + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


def paged_extend_attention(q, k_cache, v_cache, block_tables, seq_slot, query_start_loc, seq_lens, scale: float,
                           max_query_len: int, out=None):
    """q [T, Hq, D] -> [T, Hq, D]; see the module docstring. q and out need a unit last stride."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, page, num_kv_heads, _ = k_cache.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and q.stride(-1) == 1
    out = torch.empty_like(q) if out is None else out
    num_rows = seq_lens.shape[0]
    if num_tokens == 0 or num_rows == 0 or max_query_len == 0:
        return out
    _extend_kernel[(num_rows, triton.cdiv(max_query_len, BLOCK_M), num_q_heads)](
        q, k_cache, v_cache, block_tables, seq_slot, query_start_loc, seq_lens, out, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, HEAD_PAD=head_pad(head_dim), PAGE=page,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)
    return out


def gather_context(k_cache, v_cache, block_tables, seq_slot, seq_lens):
    """Each row's K and V as dense float32 [R, Hkv, P, D], P = max_blocks_per_seq * block_size
    (zeros past seq_lens), and visible [R, P]."""
    num_blocks, page, num_kv_heads, head_dim = k_cache.shape
    positions = torch.arange(block_tables.shape[1] * page, device=k_cache.device)
    visible = positions[None, :] < seq_lens[:, None].long()
    blocks = torch.where(visible, block_tables[seq_slot.long()][:, positions // page].long(), 0)
    # NOTE: one flat index_select: two-tensor advanced indexing into a layer of the pool is ~500x slower.
    slots = (blocks * page + positions % page).view(-1)
    keep = visible[:, :, None, None]  # table entries past a row's end may be stale

    def gather(cache):
        rows = cache.view(num_blocks * page, num_kv_heads, head_dim).index_select(0, slots)
        return torch.where(keep, rows.view(*blocks.shape, num_kv_heads, head_dim).float(), 0.0).transpose(1, 2)

    return gather(k_cache), gather(v_cache), visible


def paged_extend_attention_ref(q, k_cache, v_cache, block_tables, seq_slot, query_start_loc, seq_lens,
                               scale: float, max_query_len: int, out=None):
    """Plain torch, vectorised, no host sync: rows' queries padded to max_query_len, SDPA with a
    causal-and-visible mask; fully masked queries give zeros."""
    num_tokens = q.shape[0]
    out = torch.empty_like(q) if out is None else out
    if num_tokens == 0:
        return out
    keys, values, visible = gather_context(k_cache, v_cache, block_tables, seq_slot, seq_lens)
    starts = query_start_loc[:-1].long()
    n_new = query_start_loc[1:].long() - starts
    new = torch.arange(max_query_len, device=q.device)
    is_query = new[None, :] < n_new[:, None]  # [R, M]
    token = torch.where(is_query, starts[:, None] + new[None, :], 0)
    q_pos = seq_lens[:, None].long() - n_new[:, None] + new[None, :]
    causal = torch.arange(visible.shape[1], device=q.device)[None, None, :] <= q_pos[:, :, None]
    mask = (causal & visible[:, None, :] & is_query[:, :, None])[:, None]  # [R, 1, M, P]
    padded = F.scaled_dot_product_attention(q[token].float().transpose(1, 2), keys, values, attn_mask=mask,
                                            scale=scale, enable_gqa=True).nan_to_num(0.0)  # [R, Hq, M, D]
    row = torch.searchsorted(query_start_loc[1:].long(), torch.arange(num_tokens, device=q.device), right=True)
    return out.copy_(padded[row, :, torch.arange(num_tokens, device=q.device) - starts[row]])
