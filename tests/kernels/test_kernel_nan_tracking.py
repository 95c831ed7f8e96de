"""The step's first and last ops and the NaN tracking between them, each against its torch reference:
embed_tokens (ids from the plan or the device token table, token -> sequence slot), rope_store's marks of sequence slots whose q/k/v held a NaN or an inf, rms_norm_rows (the
final norm of the deciding rows, gathered)."""
import pytest
import torch

from kernel_test_utils import DEVICE, assert_close, randn
from rstitch_engine.kernels import (embed_tokens, embed_tokens_ref, rms_norm, rms_norm_ref, rms_norm_rows,
                                    rms_norm_rows_ref, rope_store, rope_store_ref)

i32 = lambda *v: torch.tensor(v, dtype=torch.int32, device=DEVICE)  # noqa: E731


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embed_tokens(dtype):
    gen = torch.Generator().manual_seed(1)
    embed = randn(50, 24, dtype=dtype, generator=gen)  # hidden not a power of two
    table = torch.randint(0, 50, (7 * 9,), generator=gen).int().to(DEVICE)  # flat [slots, max_len]
    # 3 rows: tokens [0, 3) of slot 4, [3, 4) of slot 1, [4, 7) of slot 6
    query_start_loc, seq_slot = i32(0, 3, 4, 7), i32(4, 1, 6)
    input_ids = i32(5, 9, 13, 2, 40, 41, 42)
    token_index = i32(-1, 4 * 9 + 3, -1, -1, 6 * 9 + 1, -1, 6 * 9 + 8)  # some ids from the device table
    results = []
    for fn in (embed_tokens, embed_tokens_ref):
        token_slot = torch.full((7,), -5, dtype=torch.int32, device=DEVICE)
        h = fn(embed, input_ids, token_index, table, query_start_loc=query_start_loc, seq_slot=seq_slot,
               token_slot=token_slot)
        results.append((h, token_slot))
    ids = torch.where(token_index >= 0, table[token_index.clamp(min=0).long()], input_ids)
    for h, token_slot in results:
        assert torch.equal(h, embed[ids.long()])
        assert token_slot.tolist() == [4, 4, 4, 1, 6, 6, 6]
    untracked = embed_tokens(embed, input_ids, token_index, table)
    assert torch.equal(untracked, results[0][0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_store_marks_slots_of_nonfinite_tokens(dtype):
    gen = torch.Generator().manual_seed(2)
    tokens, hq, hkv, d, page, blocks = 6, 4, 2, 16, 4, 4
    qkv = randn(tokens, (hq + 2 * hkv) * d, dtype=dtype, generator=gen)
    qkv[1, 3] = float("nan")                     # q of token 1
    qkv[2, hq * d + 5] = float("inf")            # k of token 2
    qkv[3, (hq + hkv) * d + 1] = float("-inf")   # v of token 3
    qkv[4, 2] = float("nan")                     # q of token 4, a padding token (slot -1): not checked
    slot_mapping = i32(0, 5, 6, 9, -1, 10)
    token_slot = i32(0, 1, 2, 3, 4, 0)
    positions = torch.randint(0, 64, (tokens,), generator=gen).int().to(DEVICE)
    cos_sin = randn(64, d, generator=gen)
    marks = []
    for fn in (rope_store, rope_store_ref):
        t = qkv.clone()
        q = t[:, :hq * d].view(tokens, hq, d)
        k = t[:, hq * d:(hq + hkv) * d].view(tokens, hkv, d)
        v = t[:, (hq + hkv) * d:].view(tokens, hkv, d)
        cache = [torch.zeros(blocks, page, hkv, d, dtype=dtype, device=DEVICE) for _ in range(2)]
        slots = i32(0, 0, 0, 0, 0, 1)  # slot 5 stays marked: marks are only ever set here
        fn(q, k, v, positions, cos_sin, *cache, slot_mapping, nonfinite=(token_slot, slots))
        marks.append(slots.tolist())
    assert marks[0] == marks[1] == [0, 1, 1, 1, 0, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_rows(dtype, with_residual):
    gen = torch.Generator().manual_seed(3)
    x, residual, weight = (randn(9, 40, dtype=dtype, generator=gen), randn(9, 40, dtype=dtype, generator=gen),
                           randn(40, dtype=dtype, generator=gen))
    residual = residual if with_residual else None
    rows = i32(8, 2, 5, 2)
    out = rms_norm_rows(x, weight, 1e-6, residual, rows)
    assert_close(out, rms_norm_rows_ref(x, weight, 1e-6, residual, rows), dtype)
    assert_close(out, rms_norm(x, weight, 1e-6, residual)[0][rows.long()] if with_residual
                 else rms_norm(x, weight, 1e-6)[rows.long()], dtype)
    assert rms_norm_rows(x, weight, 1e-6, residual, rows[:0]).shape == (0, 40)
