"""Block allocation, reference counts, prefix caching and eviction."""

from __future__ import annotations

from ember.engine.block_manager import BlockManager
from ember.engine.sequence import Request, Sequence
from ember.sampling_params import SamplingParams

_next = iter(range(10**6))


def seq_of(tokens: list[int]) -> Sequence:
    return Sequence(next(_next), Request(f"r{len(tokens)}", None, tokens, SamplingParams()), 0)


def compute(bm: BlockManager, seq: Sequence, n: int) -> None:
    """Pretend the model ran n more tokens of the sequence."""
    cached = bm.find_cached_prefix(seq) if seq.num_computed_tokens == 0 and not seq.block_table else []
    assert bm.allocate(seq, n if not cached else n - len(cached) * bm.block_size, cached)
    seq.num_computed_tokens += n if not cached else n - len(cached) * bm.block_size
    bm.cache_full_blocks(seq)


def test_allocate_and_free_counts():
    bm = BlockManager(10, 4)
    s = seq_of(list(range(10)))
    assert bm.allocate(s, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 7
    assert bm.allocate(s, 0) and len(s.block_table) == 3
    s.num_computed_tokens = 10
    assert bm.allocate(s, 2) and len(s.block_table) == 3  # 12 tokens still fit in 3 blocks
    assert bm.allocate(s, 3) and len(s.block_table) == 4
    bm.free(s)
    assert bm.num_free_blocks == 10 and s.block_table == []


def test_allocation_fails_cleanly_when_full():
    bm = BlockManager(3, 4)
    s = seq_of(list(range(20)))
    assert not bm.allocate(s, 20)
    assert bm.num_free_blocks == 3 and s.block_table == []


def test_prefix_hit_shares_blocks_and_counts_refs():
    bm = BlockManager(16, 4)
    a = seq_of(list(range(13)))
    compute(bm, a, 13)  # 3 full blocks cached
    b = seq_of(list(range(12)) + [99, 98])
    hits = bm.find_cached_prefix(b)
    assert [h.block_id for h in hits] == a.block_table[:3]
    assert bm.allocate(b, 2, hits)
    assert b.num_computed_tokens == 12
    assert all(bm.blocks[i].ref_cnt == 2 for i in a.block_table[:3])
    bm.free(a)
    assert all(bm.blocks[i].ref_cnt == 1 for i in b.block_table[:3])
    bm.free(b)
    assert bm.num_free_blocks == 16


def test_full_hit_leaves_last_token_to_compute():
    bm = BlockManager(8, 4)
    a = seq_of(list(range(8)))
    compute(bm, a, 8)
    b = seq_of(list(range(8)))
    assert len(bm.find_cached_prefix(b)) == 1  # not 2: the last token must be computed for logits


def test_hit_verifies_tokens_and_chain():
    bm = BlockManager(8, 4)
    a = seq_of([1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(bm, a, 9)
    # Same second block, different first block: the chained hash must miss entirely.
    b = seq_of([0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.find_cached_prefix(b) == []
    # A forged collision (same hash, different tokens) is rejected by the token check.
    blk = bm.blocks[a.block_table[0]]
    blk.token_ids = (9, 9, 9, 9)
    assert bm.find_cached_prefix(seq_of([1, 2, 3, 4, 5, 6, 7, 8, 9])) == []


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(4, 4)
    a = seq_of(list(range(9)))
    compute(bm, a, 9)
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.cached) == 2
    # Reuse from the free queue: hit takes blocks back out of the free queue.
    b = seq_of(list(range(9)))
    hits = bm.find_cached_prefix(b)
    assert len(hits) == 2 and bm.allocate(b, 1, hits)
    assert bm.num_free_blocks == 1  # two blocks reused, one new for the ninth token
    bm.free(b)
    # Filling the cache with other data evicts the old blocks.
    c = seq_of(list(range(100, 116)))
    compute(bm, c, 16)
    assert bm.find_cached_prefix(seq_of(list(range(9)))) == []
    assert bm.usage == 1.0
    bm.free(c)


def test_tail_blocks_evicted_first():
    bm = BlockManager(6, 2)
    a = seq_of(list(range(7)))
    compute(bm, a, 7)
    bm.free(a)
    # One new block needed: it must come from a's tail (least useful), keeping the prefix cached.
    c = seq_of([50, 51])
    compute(bm, c, 2)
    assert len(bm.find_cached_prefix(seq_of(list(range(7))))) == 3
