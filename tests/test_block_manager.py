"""The C++ block manager through its bindings: allocation, growth across block boundaries, rollback,
exhaustion, double free, and the free count returning to its start; prefix caching: matching by content
and chain, sharing by reference, KV per model, eviction least recently released first, forgetting."""
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


def cached_table(bm, tokens):
    """A table over `tokens` with every full block hashed, as the scheduler leaves a committed prefix."""
    t = bm.cover([], len(tokens))
    for i in range(len(tokens) // bm.block_size):
        bm.hash_block(t, tokens, i)
    return t


def test_match_finds_equal_prefixes_by_content_and_chain():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = list(range(100, 111))  # 2 full blocks and 3 tokens
    t = cached_table(bm, a)
    assert bm.num_cached == 2
    assert bm.match(a + [7], limit=12) == t[:2]
    assert bm.match(a[:8], limit=7) == t[:1], "a match leaves the last token to feed: at most limit tokens"
    assert bm.match(a[:5] + [0] + a[6:], limit=11) == t[:1], "a differing token ends the match at its block"
    assert bm.match([0] + a[1:], limit=11) == []
    assert bm.match(a[4:8] + a[:4], limit=8) == [], "a block's hash chains the blocks before it"


def test_shared_blocks_are_reference_counted_and_stay_cached():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    t = cached_table(bm, a)
    shared = bm.share(bm.match(a, limit=8))
    assert shared == t[:2] and bm.num_free == 5, "sharing takes no new block"
    bm.release(t)
    assert bm.num_free == 6 and bm.num_cached == 2, "the unhashed third block is freed; the shared ones are held"
    bm.release(shared)
    assert bm.num_free == 8, "cached blocks nobody holds count as free"
    assert bm.match(a, limit=8) == t[:2], "and can still be matched"
    again = bm.share(bm.match(a, limit=8))
    assert bm.num_free == 6
    bm.release(again)
    with pytest.raises(RuntimeError, match="not in use"):
        bm.release(again)


def test_kv_is_recorded_per_model():
    bm = BlockManager(num_blocks=4, block_size=4)
    t = cached_table(bm, list(range(8)))
    bm.set_kv(t[0], 0)
    bm.set_kv(t[1], 1)
    assert [bm.has_kv(t[0], m) for m in (0, 1)] == [True, False]
    assert [bm.has_kv(t[1], m) for m in (0, 1)] == [False, True]


def test_eviction_takes_the_least_recently_released_and_the_tail_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    ta, tb = cached_table(bm, a), cached_table(bm, b)
    bm.set_kv(ta[0], 0)
    bm.release(ta)  # released first: evicted first, its last block before its first
    bm.release(tb)
    assert bm.num_cached == 4 and bm.num_free == 6
    fresh = bm.cover([], 6)  # 2 never used + 1 evicted
    assert ta[1] in fresh and not bm.is_cached(ta[1])
    assert bm.match(a, limit=4) == ta[:1] and bm.match(b, limit=4) == tb
    fresh = bm.cover(fresh, 8)
    assert ta[0] in fresh and not bm.has_kv(ta[0], 0), "an evicted block comes back without KV"
    assert bm.match(a, limit=4) == [] and bm.match(b, limit=4) == tb


def test_an_equal_block_stays_private_and_the_chain_goes_on():
    bm = BlockManager(num_blocks=8, block_size=2)
    first = cached_table(bm, [1, 2, 3, 4])
    second = cached_table(bm, [1, 2, 9, 9])  # its first block equals first[0]: not registered again
    assert not bm.is_cached(second[0]) and bm.is_cached(second[1])
    assert bm.match([1, 2, 9, 9, 0], limit=4) == [first[0], second[1]]


def test_forget_and_reset():
    bm = BlockManager(num_blocks=4, block_size=2)
    t = cached_table(bm, [1, 2, 3, 4])
    assert not bm.reset_cache(), "not while a block is held"
    bm.forget(t[1])
    bm.release(t)
    assert bm.num_free == 4 and bm.num_cached == 1
    assert bm.match([1, 2, 3, 4], limit=4) == t[:1]
    assert bm.reset_cache() and bm.num_cached == 0 and bm.num_free == 4
    assert bm.match([1, 2, 3, 4], limit=4) == []
