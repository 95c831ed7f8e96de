"""The C++ block manager through its bindings: allocation, growth across block boundaries, rollback,
exhaustion, double free, and the free count returning to its start."""
import pytest

from rstitch_engine._C import BlockManager


def test_cover_grows_one_block_per_boundary():
    bm = BlockManager(num_blocks=8, block_size=4)
    t = bm.cover([], 1)
    assert len(t) == 1 and bm.num_free == 7
    t = bm.cover(t, 4)
    assert len(t) == 1, "4 tokens still fit one block of 4"
    t = bm.cover(t, 5)
    assert len(t) == 2 and bm.num_free == 6
    t = bm.cover(t, 13)
    assert len(t) == 4 and len(set(t)) == 4


def test_slots_follow_the_table():
    bm = BlockManager(num_blocks=8, block_size=4)
    other = bm.cover([], 4)  # take a block so the next table is not [0, 1, ...]
    t = bm.cover([], 9)
    assert other[0] not in t
    slots = [bm.slot(t, p) for p in range(9)]
    assert slots == [t[p // 4] * 4 + p % 4 for p in range(9)]
    assert len(set(slots)) == 9


def test_truncate_frees_trailing_blocks_only():
    bm = BlockManager(num_blocks=8, block_size=4)
    t = bm.cover([], 12)
    t2 = bm.truncate(t, 5)
    assert t2 == t[:2] and bm.num_free == 6
    t3 = bm.truncate(t2, 5)
    assert t3 == t2, "truncating to the same length frees nothing"
    assert bm.truncate(t3, 0) == [] and bm.num_free == 8


def test_exhaustion_is_an_error_not_a_partial_allocation():
    bm = BlockManager(num_blocks=3, block_size=4)
    t = bm.cover([], 8)
    assert not bm.can_cover(t, 13)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.cover(t, 13)
    assert bm.num_free == 1, "a failed cover must not take blocks"
    assert bm.can_cover(t, 12)


def test_double_free_is_caught():
    bm = BlockManager(num_blocks=4, block_size=4)
    t = bm.cover([], 4)
    bm.release(list(t))
    with pytest.raises(RuntimeError, match="not in use"):
        bm.release(list(t))


def test_free_count_returns_after_many_tables():
    bm = BlockManager(num_blocks=64, block_size=16)
    tables = [bm.cover([], n) for n in (1, 16, 17, 100, 33)]
    assert bm.num_free == 64 - sum(len(t) for t in tables)
    ids = [b for t in tables for b in t]
    assert len(ids) == len(set(ids)), "no block is handed out twice"
    for t in tables:
        bm.release(t)
    assert bm.num_free == 64


@pytest.mark.parametrize("num_blocks, block_size", [(0, 16), (4, 0)])
def test_bad_construction(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)
