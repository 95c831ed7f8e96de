"""Paged decode attention (one query per row), flash-decoding split over the context.

Row b's query sits at position seq_lens[b] - 1 and attends keys [0, seq_lens[b]) of sequence slot
seq_slot[b] through block_tables. One program per (row, kv head, split) serves all q heads of the GQA
group, so each K/V tile is read once per group.

NOTE: the group's q heads are padded to 16 rows and multiplied with tl.dot (tensor cores). A
broadcast multiply-sum would hold a [group, BLOCK_N, D] product in registers (7 x 64 x 128 floats);
the padded rows cost only tensor-core cycles, which are idle in this memory-bound kernel.
NOTE: splits follow the live context, on the device. `num_splits` is the launched bound; each row's own
length, read in-kernel, cuts its context into at most that many BLOCK_N-aligned ranges of at least
MIN_TOKENS_PER_SPLIT keys (a 300-token row uses 2 splits, a 100k-token row all of them), and the splits
past its end only arrive. Partial outputs and base-2 log-sum-exps go to scratch, and the last split of a
(row, kv head) to arrive (common.last_arrival) merges them: one launch. `num_splits=None` fills the device
from B * Hkv, bounded by MAX_SPLITS and by the widest context the block table allows: a graph's block
table spans max_model_len (131072 positions: 264 splits for the 1.5B at batch 1 before this bound, and a
merge padded to 512 that spilled), so the bound only limits idle programs.
"""
import torch
import triton
import triton.language as tl

from .attention_tile import LOG2E, attend_paged, head_pad
from .common import arrival_counters, last_arrival, num_sms
from .extend_attention import paged_extend_attention_ref

BLOCK_N = 64
NUM_WARPS = 4
PROGRAMS_PER_SM = 4
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64  # bounds the idle programs of a short live context and the reduce's register tile


@triton.jit
def _split_length(seq_len, num_splits, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr):
    """Keys per split of a row of `seq_len` keys: BLOCK_N-aligned, at least MIN_SPLIT."""
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N, MIN_SPLIT)


@triton.jit
def _merge_splits(part_out_ptr, part_lse_ptr, out_ptr, part, ran, head_out,
                  HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """One q head: the softmax-weighted mean of its `ran` split outputs (part: index of split 0)."""
    split = tl.arange(0, SPLITS_PAD)
    valid = split < ran
    lse = tl.load(part_lse_ptr + part + split, mask=valid, other=-1.0e30, cache_modifier=".cg")  # no inf - inf
    weight = tl.where(valid, tl.exp2(lse - tl.max(lse, axis=0)), 0.0)
    dims = tl.arange(0, HEAD_PAD)
    dim_mask = dims < HEAD_DIM
    parts = tl.load(part_out_ptr + (part + split)[:, None] * HEAD_DIM + dims[None, :],
                    mask=valid[:, None] & dim_mask[None, :], other=0.0, cache_modifier=".cg")
    total = tl.sum(weight, axis=0)
    out = tl.sum(weight[:, None] * parts, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(head_out + dims, out.to(out_ptr.dtype.element_ty), mask=dim_mask)


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_slot_ptr, seq_lens_ptr,
                   out_ptr, part_out_ptr, part_lse_ptr, counter_ptr, scale_log2e, num_splits,
                   q_stride_b, q_stride_h, out_stride_b, out_stride_h, bt_stride,
                   stride_block, stride_offset, stride_head,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                   PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr, SPLITS_PAD: tl.constexpr,
                   FUSED: tl.constexpr):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + row)
    split_len = _split_length(seq_len, num_splits, BLOCK_N, MIN_SPLIT)
    key_begin = split * split_len
    key_end = tl.minimum(key_begin + split_len, seq_len)  # <= key_begin past the row's end: no keys

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
        part = (row * GROUP * tl.num_programs(1) + heads) * num_splits  # split 0 of each head: [B, Hq, splits]
        tl.store(part_lse_ptr + part + split, m + tl.log2(tl.maximum(l, 1.0)), mask=head_mask)  # l: 0 or >= 1
        tl.store(part_out_ptr + (part + split)[:, None] * HEAD_DIM + dims[None, :], out, mask=mask)
        if last_arrival(counter_ptr + row * tl.num_programs(1) + kv_head, num_splits):
            ran = tl.cdiv(seq_len, split_len)
            first = (row * GROUP * tl.num_programs(1) + kv_head * GROUP) * num_splits
            for g in range(GROUP):
                _merge_splits(part_out_ptr, part_lse_ptr, out_ptr, first + g * num_splits, ran,
                              out_ptr + row * out_stride_b + (kv_head * GROUP + g) * out_stride_h,
                              HEAD_DIM, HEAD_PAD, SPLITS_PAD)


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
    scratch_out = scratch_lse = counters = out
    if num_splits > 1:
        scratch_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
        scratch_out = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        counters = arrival_counters(q.device, batch * num_kv_heads)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_slot, seq_lens, out, scratch_out, scratch_lse, counters,
        scale * LOG2E, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        HEAD_PAD=head_pad(head_dim), PAGE=page, BLOCK_N=BLOCK_N, MIN_SPLIT=MIN_TOKENS_PER_SPLIT,
        SPLITS_PAD=triton.next_power_of_2(num_splits), FUSED=num_splits == 1, num_warps=NUM_WARPS)
    return out


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_slot, seq_lens, scale: float,
                               out=None, num_splits: int | None = None):
    """Plain torch: the extend reference with one new token per row. `num_splits` is ignored."""
    query_start_loc = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_extend_attention_ref(q, k_cache, v_cache, block_tables, seq_slot, query_start_loc, seq_lens,
                                      scale, 1, out=out)
