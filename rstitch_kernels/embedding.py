"""The first op of a step: each token's id, its embedding row, and (for NaN detection) its sequence slot.

A token's id is in the plan (input_ids), or, where the plan gives token_index >= 0, in the device token
table: a token produced by the previous step, which the host has not read yet. With the NaN tracking
arguments (all or none), the op also writes token_slot[t] = seq_slot[row of t] (the row found from
query_start_loc), through which rstitch_kernels/rope_store.py marks the slots whose q/k/v held a NaN.
One program per token.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _embed_kernel(input_ids_ptr, token_index_ptr, token_table_ptr, embed_ptr, out_ptr, hidden, embed_stride,
                  out_stride, query_start_loc_ptr, num_rows, seq_slot_ptr, token_slot_ptr,
                  BLOCK_H: tl.constexpr, ROWS_PAD: tl.constexpr, TRACK: tl.constexpr):
    token = tl.program_id(0)
    index = tl.load(token_index_ptr + token)
    table_id = tl.load(token_table_ptr + tl.maximum(index, 0).to(tl.int64))
    token_id = tl.where(index >= 0, table_id, tl.load(input_ids_ptr + token))
    cols = tl.arange(0, BLOCK_H)
    row = tl.load(embed_ptr + token_id.to(tl.int64) * embed_stride + cols, mask=cols < hidden)
    tl.store(out_ptr + token.to(tl.int64) * out_stride + cols, row, mask=cols < hidden)
    if TRACK:
        rows = tl.arange(0, ROWS_PAD)
        ends = tl.load(query_start_loc_ptr + 1 + rows, mask=rows < num_rows, other=2147483647)
        slot = tl.load(seq_slot_ptr + tl.sum((ends <= token).to(tl.int32), axis=0))
        tl.store(token_slot_ptr + token, slot)


def embed_tokens(embed, input_ids, token_index, token_table, *, query_start_loc=None, seq_slot=None,
                 token_slot=None):
    """-> [T, hidden] embedding rows of the T tokens; token_table is flat (token_index indexes it)."""
    num_tokens, hidden = input_ids.shape[0], embed.shape[1]
    out = torch.empty((num_tokens, hidden), dtype=embed.dtype, device=embed.device)
    if num_tokens == 0:
        return out
    track = token_slot is not None
    num_rows = seq_slot.shape[0] if track else 1
    placeholder = input_ids  # absent tracking operands: never read (TRACK is constexpr)
    _embed_kernel[(num_tokens,)](
        input_ids, token_index, token_table, embed, out, hidden, embed.stride(0), out.stride(0),
        *((query_start_loc, num_rows, seq_slot, token_slot) if track else (placeholder, num_rows) + (placeholder,) * 2),
        BLOCK_H=triton.next_power_of_2(hidden), ROWS_PAD=triton.next_power_of_2(num_rows), TRACK=track,
        num_warps=4)
    return out


def embed_tokens_ref(embed, input_ids, token_index, token_table, *, query_start_loc=None, seq_slot=None,
                     token_slot=None):
    """Plain torch, the same results."""
    ids = torch.where(token_index >= 0, token_table[token_index.clamp(min=0)], input_ids)
    if token_slot is not None:
        arange = torch.arange(ids.shape[0], dtype=query_start_loc.dtype, device=ids.device)
        token_slot.copy_(seq_slot[torch.searchsorted(query_start_loc[1:], arange, right=True)])
    return F.embedding(ids, embed)
