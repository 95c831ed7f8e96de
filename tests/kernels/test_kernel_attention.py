"""Paged decode / extend attention against their torch references and a dense float64 SDPA on
contiguous K/V (blocks assigned in shuffled order, sequence slots shuffled, stale table entries)."""
import pytest
import torch

from kernel_test_utils import DEVICE, PagedKV, assert_close, dense_attention, poison, randn
from rstitch_engine.kernels.common import arrival_counters
from rstitch_engine.kernels import (paged_decode_attention, paged_decode_attention_ref, paged_extend_attention,
                                    paged_extend_attention_ref, store_kv)


def check_decode(seq_lens, num_q_heads, num_kv_heads, head_dim, page, dtype, num_splits, padded_rows=()):
    kv = PagedKV(seq_lens, num_kv_heads, head_dim, page, dtype, seed=sum(seq_lens) + head_dim)
    seq_slot = kv.seq_slot.clone()
    seq_slot[list(padded_rows)] = -1
    batch = len(seq_lens)
    qkv = randn(batch, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype,
                generator=torch.Generator().manual_seed(batch))
    q = qkv[:, :num_q_heads * head_dim].view(batch, num_q_heads, head_dim)  # strided, like a qkv split
    scale = head_dim ** -0.5
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, seq_slot, kv.seq_lens, scale)
    out = poison(torch.empty_like(q))
    assert paged_decode_attention(*args, out=out, num_splits=num_splits) is out
    assert not arrival_counters(q.device, 1).any(), "the merging split resets its counter for the next launch"
    assert_close(out, paged_decode_attention_ref(*args), dtype)
    live = [r for r in range(batch) if seq_lens[r] > 0]
    dense = dense_attention([q[r:r + 1] for r in live], [kv.keys[r] for r in live], [kv.values[r] for r in live],
                            [torch.tensor([seq_lens[r] - 1]) for r in live], scale)
    assert_close(out[live], dense, dtype)
    assert (out[[r for r in range(batch) if seq_lens[r] == 0]] == 0).all()  # padding rows write zeros


@pytest.mark.parametrize("seq_lens, num_q_heads, num_kv_heads, head_dim, page, dtype, num_splits", [
    ([1], 4, 4, 16, 8, torch.float32, None),
    ([15, 16, 17, 33, 100, 0], 14, 2, 32, 16, torch.float32, None),
    ([100, 1, 64, 0], 8, 4, 64, 16, torch.bfloat16, 3),
    ([130, 17], 7, 1, 128, 32, torch.bfloat16, 1),
    ([33, 200, 5], 4, 2, 32, 64, torch.float16, 4),
    ([9, 40, 0], 4, 2, 8, 4, torch.float32, 3),    # head dims below tl.dot's 16 and not powers of two:
    ([21, 3], 4, 1, 80, 8, torch.bfloat16, None),  # tiles padded to 16 / 128, the padding masked
    ([600, 1300, 257, 0], 8, 2, 32, 16, torch.float32, 4),  # splits of >= 256 keys, merged by the last one
    ([700, 300], 4, 1, 64, 16, torch.bfloat16, None),
])
def test_decode(seq_lens, num_q_heads, num_kv_heads, head_dim, page, dtype, num_splits):
    check_decode(seq_lens, num_q_heads, num_kv_heads, head_dim, page, dtype, num_splits,
                 padded_rows=[r for r, n in enumerate(seq_lens) if n == 0])


def check_extend(rows, num_q_heads, num_kv_heads, head_dim, page, dtype, extra_query_len=0):
    """rows: (tokens already cached, new tokens) per row."""
    seq_lens = [before + new for before, new in rows]
    n_new = [new for _, new in rows]
    kv = PagedKV(seq_lens, num_kv_heads, head_dim, page, dtype, seed=sum(seq_lens))
    num_tokens = sum(n_new)
    q = randn(num_tokens, num_q_heads, head_dim, dtype=dtype, generator=torch.Generator().manual_seed(num_tokens))
    query_start_loc = torch.tensor([0] + n_new, device=DEVICE).cumsum(0).int()
    scale = head_dim ** -0.5
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_slot, query_start_loc, kv.seq_lens, scale,
            max(n_new) + extra_query_len)
    out = poison(torch.empty_like(q))
    assert paged_extend_attention(*args, out=out) is out
    assert_close(out, paged_extend_attention_ref(*args), dtype)
    starts = query_start_loc.tolist()
    dense = dense_attention([q[starts[r]:starts[r + 1]] for r in range(len(rows))], kv.keys, kv.values,
                            [torch.arange(b, b + n) for b, n in rows], scale)
    assert_close(out, dense, dtype)


@pytest.mark.parametrize("rows, num_q_heads, num_kv_heads, head_dim, page, dtype", [
    ([(0, 5), (10, 1), (7, 0), (16, 17), (3, 40)], 4, 2, 32, 16, torch.float32),
    ([(0, 70)], 7, 1, 64, 8, torch.bfloat16),
    ([(30, 3), (0, 1), (100, 15)], 8, 8, 128, 32, torch.bfloat16),
    ([(1, 16), (0, 33)], 6, 3, 16, 64, torch.float16),
    ([(0, 9), (5, 3)], 4, 2, 8, 4, torch.float32),
    ([(12, 4)], 4, 1, 80, 8, torch.bfloat16),
])
def test_extend(rows, num_q_heads, num_kv_heads, head_dim, page, dtype):
    check_extend(rows, num_q_heads, num_kv_heads, head_dim, page, dtype)


def test_extend_programs_past_max_query_len_exit():
    check_extend([(4, 3), (0, 2)], 4, 2, 32, 16, torch.float32, extra_query_len=70)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_then_decode_through_store_kv(dtype):
    """Prompt K/V written by store_kv (shuffled slots), prefilled by extend, then one decode step."""
    prompt_lens, num_q_heads, num_kv_heads, head_dim, page = [19, 5, 33], 4, 2, 32, 8
    gen = torch.Generator().manual_seed(11)
    rows = len(prompt_lens)
    num_blocks = sum(-(-(n + 1) // page) for n in prompt_lens) + 2
    k_cache = poison(torch.empty(num_blocks, page, num_kv_heads, head_dim, dtype=dtype, device=DEVICE))
    v_cache = poison(torch.empty_like(k_cache))
    free = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.zeros(rows, num_blocks, dtype=torch.int32)
    for r, n in enumerate(prompt_lens):
        for b in range(-(-(n + 1) // page)):
            block_tables[r, b] = free.pop()
    block_tables = block_tables.to(DEVICE)
    total = [n + 1 for n in prompt_lens]
    keys = [randn(num_kv_heads, n, head_dim, dtype=dtype, generator=gen) for n in total]
    values = [randn(num_kv_heads, n, head_dim, dtype=dtype, generator=gen) for n in total]
    q_all = [randn(n, num_q_heads, head_dim, dtype=dtype, generator=gen) for n in total]
    seq_slot = torch.arange(rows, dtype=torch.int32, device=DEVICE)

    def slots(r, positions):
        return block_tables[r, positions // page].long() * page + positions % page

    def store(positions_per_row):  # positions_per_row[r]: which positions of row r to write
        key = torch.cat([keys[r][:, p].transpose(0, 1) for r, p in enumerate(positions_per_row)])
        value = torch.cat([values[r][:, p].transpose(0, 1) for r, p in enumerate(positions_per_row)])
        mapping = torch.cat([slots(r, p.to(DEVICE)) for r, p in enumerate(positions_per_row)])
        store_kv(key, value, k_cache, v_cache, torch.cat([mapping, torch.tensor([-1], device=DEVICE)]).int()[:-1])

    scale = head_dim ** -0.5
    store([torch.arange(n) for n in prompt_lens])
    q = torch.cat([q_all[r][:n] for r, n in enumerate(prompt_lens)])
    query_start_loc = torch.tensor([0] + prompt_lens, device=DEVICE).cumsum(0).int()
    prompt_lens_t = torch.tensor(prompt_lens, dtype=torch.int32, device=DEVICE)
    out = paged_extend_attention(q, k_cache, v_cache, block_tables, seq_slot, query_start_loc, prompt_lens_t,
                                 scale, max(prompt_lens))
    dense = dense_attention([q_all[r][:n] for r, n in enumerate(prompt_lens)], keys, values,
                            [torch.arange(n) for n in prompt_lens], scale)
    assert_close(out, dense, dtype)

    store([torch.tensor([n]) for n in prompt_lens])
    q_step = torch.stack([q_all[r][n] for r, n in enumerate(prompt_lens)])
    out = paged_decode_attention(q_step, k_cache, v_cache, block_tables, seq_slot, prompt_lens_t + 1, scale)
    dense = dense_attention([q_all[r][n:n + 1] for r, n in enumerate(prompt_lens)], keys, values,
                            [torch.tensor([n]) for n in prompt_lens], scale)
    assert_close(out, dense, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("context", [1024, 8192])
@pytest.mark.parametrize("num_q_heads, num_kv_heads", [(28, 4), (12, 2)])
def test_decode_real_shapes_cuda(context, num_q_heads, num_kv_heads):
    seq_lens = [context - 37 * r for r in range(32)]
    check_decode(seq_lens, num_q_heads, num_kv_heads, 128, 16, torch.bfloat16, None)


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [[(0, 1000)], [(500, 300), (0, 2048), (4000, 1)]])
def test_extend_real_shapes_cuda(rows):
    check_extend(rows, 28, 4, 128, 16, torch.bfloat16)


def test_decode_splits_are_bounded_at_h200_settings(monkeypatch):
    """A graph's block table spans max_model_len: at 131072 positions the 1.5B at batch 1 would get 264
    splits (and a reduce padded to 512 that spilled); the grid is bounded, the work follows the live length."""
    from rstitch_engine.kernels import decode_attention as D

    monkeypatch.setattr(D, "num_sms", lambda device: 132)
    cpu = torch.device("cpu")
    assert D._default_splits(1, 2, 131072, cpu) == D.MAX_SPLITS == 64
    assert D._default_splits(1, 2, 1024, cpu) == 4  # short tables: MIN_TOKENS_PER_SPLIT decides
    assert D._default_splits(64, 4, 131072, cpu) == 3  # large batches fill the device without splitting much
    check_decode([300, 5, 0], 4, 2, 16, 16, torch.float32, num_splits=64, padded_rows=[2])  # idle splits exit
