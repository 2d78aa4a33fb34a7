"""Block manager: all-or-nothing allocation, ref counts, blocks returned exactly once."""

from __future__ import annotations

from lorafleet.worker.engine.block_manager import BlockManager
from lorafleet.worker.engine.sequence import SamplingParams, Sequence


def _seq(n: int) -> Sequence:
    return Sequence("s", list(range(n)), SamplingParams())


def test_allocation_grows_by_block_and_is_all_or_nothing():
    bm = BlockManager(num_blocks=5, block_size=4)
    a, b = _seq(9), _seq(8)
    assert bm.allocate_to(a, 9) and len(a.block_table) == 3
    assert bm.allocate_to(a, 12) and len(a.block_table) == 3  # still fits the 3rd block
    assert not bm.allocate_to(b, 9)  # needs 3, only 2 free: nothing taken
    assert b.block_table == [] and bm.num_free == 2
    assert bm.allocate_to(b, 8) and bm.num_free == 0
    assert len(set(a.block_table) | set(b.block_table)) == 5
    bm.free(a)
    assert bm.num_free == 3 and a.block_table == []
    bm.free(b)
    assert bm.num_free == 5 and bm.ref_counts == [0] * 5


def test_shared_block_is_freed_by_last_user():
    bm = BlockManager(num_blocks=3, block_size=2)
    a, b = _seq(2), _seq(2)
    assert bm.allocate_to(a, 2)
    b.block_table = list(a.block_table)  # share (fork / prefix) by reference count
    bm.ref_counts[a.block_table[0]] += 1
    bm.free(a)
    assert bm.num_free == 2
    bm.free(b)
    assert bm.num_free == 3


def test_prefix_cache_reuses_full_blocks_salted_by_adapter():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = _seq(10)  # tokens 0..9: two full blocks + 2
    assert bm.match_prefix(a, None) == 0 and bm.allocate_to(a, 10)
    a.num_computed_tokens = 10
    bm.commit(a, None)
    assert len(bm.cached) == 2 and len(a.block_hashes) == 2
    b = _seq(9)  # same first 8 tokens: reuses both blocks, computes the 9th token itself
    assert bm.match_prefix(b, None) == 8 and b.block_table == a.block_table[:2]
    assert bm.ref_counts[a.block_table[0]] == 2
    c = _seq(8)  # exactly two blocks: the last block is recomputed so the last token yields logits
    assert bm.match_prefix(c, None) == 4
    d = _seq(10)
    assert bm.match_prefix(d, ("adapter", "v1")) == 0  # other adapter version: other KV, no reuse
    for s in (a, b, c):
        bm.free(s)
    assert bm.num_free == 8 and len(bm.cached) == 2  # freed blocks keep their contents until reallocated
    e = _seq(9)
    assert bm.match_prefix(e, None) == 8 and bm.num_free == 6
    bm.free(e)
    big = _seq(32)
    assert bm.allocate_to(big, 32) and not bm.cached  # reallocation evicts the cached hashes
    bm.free(big)
