"""Paged decode attention (one query per row), flash-decoding split over the context.

Row b's query sits at position seq_lens[b] - 1 and attends keys [0, seq_lens[b]) of sequence slot
seq_slot[b] through block_tables. One program per (row, kv head, split) serves all q heads of the GQA
group, so each K/V tile is read once per group.

NOTE: the group's q heads are padded to 16 rows and multiplied with tl.dot (tensor cores). A
broadcast multiply-sum would hold a [group, BLOCK_N, D] product in registers (7 x 64 x 128 floats);
the padded rows cost only tensor-core cycles, which are idle in this memory-bound kernel.
NOTE: each row's context is cut into `num_splits` equal, BLOCK_N-aligned ranges (computed in-kernel
from its own length, so rows of any length fill all splits); splits past a short row's end exit at
once. Partial outputs and base-2 log-sum-exps go to scratch, and a reduce kernel merges them.
`num_splits=None` fills the device from B * Hkv and the widest context the block table allows, at most
MAX_SPLITS: the block table of a graph spans max_model_len (131072 positions: 264 splits for the 1.5B at
batch 1, a reduce padded to 512 that spilled), while the work follows each row's live length.
"""
import torch
import triton
import triton.language as tl

from .attention_tile import LOG2E, attend_paged, head_pad
from .common import num_sms
from .extend_attention import paged_extend_attention_ref

BLOCK_N = 64
NUM_WARPS = 4
PROGRAMS_PER_SM = 4
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64  # bounds the idle programs of a short live context and the reduce's register tile


@triton.jit
def _split_length(seq_len, num_splits, BLOCK_N: tl.constexpr):
    return tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_slot_ptr, seq_lens_ptr,
                   out_ptr, part_out_ptr, part_lse_ptr, scale_log2e, num_splits,
                   q_stride_b, q_stride_h, out_stride_b, out_stride_h, bt_stride,
                   stride_block, stride_offset, stride_head,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                   PAGE: tl.constexpr, BLOCK_N: tl.constexpr, FUSED: tl.constexpr):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + row)
    split_len = _split_length(seq_len, num_splits, BLOCK_N)
    key_begin = split * split_len
    if not FUSED:
        if key_begin >= seq_len:
            return  # past this row's end; the reduce kernel knows which splits ran
    key_end = tl.minimum(key_begin + split_len, seq_len)

    group = tl.arange(0, GROUP_PAD)
    head_mask = group < GROUP
    heads = kv_head * GROUP + group
    dims = tl.arange(0, HEAD_PAD)
    mask = head_mask[:, None] & (dims < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + row * q_stride_b + heads[:, None] * q_stride_h + dims[None, :], mask=mask, other=0.0)
    block_table_row = block_tables_ptr + tl.load(seq_slot_ptr + row).to(tl.int64) * bt_stride
    m, l, acc = attend_paged(q, k_cache_ptr, v_cache_ptr, block_table_row, key_begin, key_end, 0, kv_head,
                             stride_block, stride_offset, stride_head, scale_log2e,
                             False, PAGE, HEAD_DIM, HEAD_PAD, BLOCK_N)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]  # seq_len == 0: zeros
    if FUSED:
        tl.store(out_ptr + row * out_stride_b + heads[:, None] * out_stride_h + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        part = (row * GROUP * tl.num_programs(1) + heads) * num_splits + split  # [B, Hq, splits]
        tl.store(part_lse_ptr + part, m + tl.log2(l), mask=head_mask)
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], out, mask=mask)


@triton.jit
def _decode_reduce_kernel(part_out_ptr, part_lse_ptr, seq_lens_ptr, out_ptr, out_stride_b, out_stride_h,
                          num_splits, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                          SPLITS_PAD: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + row)
    ran = tl.cdiv(seq_len, tl.maximum(_split_length(seq_len, num_splits, BLOCK_N), 1))
    split = tl.arange(0, SPLITS_PAD)
    valid = split < ran
    part = (row * tl.num_programs(1) + head) * num_splits + split
    lse = tl.load(part_lse_ptr + part, mask=valid, other=-1.0e30)  # finite: no inf - inf
    weight = tl.where(valid, tl.exp2(lse - tl.max(lse, axis=0)), 0.0)
    dims = tl.arange(0, HEAD_PAD)
    dim_mask = dims < HEAD_DIM
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=valid[:, None] & dim_mask[None, :],
                    other=0.0)
    total = tl.sum(weight, axis=0)
    out = tl.sum(weight[:, None] * parts, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * out_stride_b + head * out_stride_h + dims, out.to(out_ptr.dtype.element_ty),
             mask=dim_mask)


def _default_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    fill = triton.cdiv(PROGRAMS_PER_SM * num_sms(device), max(1, batch * num_kv_heads))
    return max(1, min(fill, triton.cdiv(max_context, MIN_TOKENS_PER_SPLIT), MAX_SPLITS))


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_slot, seq_lens, scale: float,
                           out=None, num_splits: int | None = None):
    """q [B, Hq, D] -> [B, Hq, D]; see the module docstring. q and out need a unit last stride."""
    batch, num_q_heads, head_dim = q.shape
    _, page, num_kv_heads, _ = k_cache.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and q.stride(-1) == 1
    out = torch.empty_like(q) if out is None else out
    if batch == 0:
        return out
    group = num_q_heads // num_kv_heads
    if num_splits is None:
        num_splits = _default_splits(batch, num_kv_heads, block_tables.shape[1] * page, q.device)
    scratch_out = scratch_lse = out
    if num_splits > 1:
        scratch_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
        scratch_out = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_slot, seq_lens, out, scratch_out, scratch_lse, scale * LOG2E, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        HEAD_PAD=head_pad(head_dim), PAGE=page, BLOCK_N=BLOCK_N, FUSED=num_splits == 1, num_warps=NUM_WARPS)
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_q_heads)](
            scratch_out, scratch_lse, seq_lens, out, out.stride(0), out.stride(1), num_splits,
            HEAD_DIM=head_dim, HEAD_PAD=head_pad(head_dim), BLOCK_N=BLOCK_N,
            SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=NUM_WARPS)
    return out


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_slot, seq_lens, scale: float,
                               out=None, num_splits: int | None = None):
    """Plain torch: the extend reference with one new token per row. `num_splits` is ignored."""
    query_start_loc = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_extend_attention_ref(q, k_cache, v_cache, block_tables, seq_slot, query_start_loc, seq_lens,
                                      scale, 1, out=out)
