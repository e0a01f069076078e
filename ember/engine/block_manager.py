"""Paged KV cache bookkeeping: block allocation, reference counts and automatic prefix caching.

A full block of KV is identified by a chained hash of (hash of the previous block, its token ids). Freed blocks
keep their contents and hash and sit in an LRU free queue, so a later request with the same prefix can take
them back; a block is only forgotten when the allocator hands it out for something else.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ember.engine.sequence import Sequence


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    # What the hash stands for, kept to verify a hit (a hash collision must never return wrong KV).
    parent_hash: int | None = None
    token_ids: tuple[int, ...] | None = None


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Blocks with ref_cnt 0, least recently freed first.
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[int, KVBlock] = {}
        # Per sequence: hashes of its full blocks, in order (registered or looked up).
        self._seq_hashes: dict[int, list[int]] = {}
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    # ---------------------------------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -------------------------------------------------------------------------------- prefix caching
    def _prompt_hashes(self, seq: Sequence, num_blocks: int) -> list[tuple[int, int | None, tuple[int, ...]]]:
        out = []
        parent: int | None = None
        bs = self.block_size
        for i in range(num_blocks):
            toks = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, toks)
            out.append((h, parent, toks))
            parent = h
        return out

    def find_cached_prefix(self, seq: Sequence) -> list[KVBlock]:
        """The longest run of cached full blocks at the start of the sequence's tokens.

        At least one token is always left to compute, so the step that follows produces logits.
        """
        if not self.enable_prefix_caching:
            return []
        # Only known token ids can be hashed (a preempted sequence may still have a pending one).
        max_blocks = (min(seq.num_tokens - 1, len(seq.token_ids))) // self.block_size
        hits: list[KVBlock] = []
        for h, parent, toks in self._prompt_hashes(seq, max_blocks):
            b = self.cached.get(h)
            if b is None or b.parent_hash != parent or b.token_ids != toks:
                break
            hits.append(b)
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits

    # ------------------------------------------------------------------------------------ allocation
    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[KVBlock] | None = None) -> bool:
        if cached:
            need = self.blocks_needed(len(cached) * self.block_size + num_new_tokens) - len(cached)
            # Cached blocks sitting in the free queue are not free to use for new data.
            need += sum(1 for b in cached if b.ref_cnt == 0)
        else:
            need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[KVBlock] | None = None) -> bool:
        """Give the sequence slots for `num_new_tokens` more tokens (taking `cached` prefix blocks first)."""
        if not self.can_allocate(seq, num_new_tokens, cached):
            return False
        if cached:
            assert not seq.block_table, "a cached prefix is only attached to a fresh sequence"
            for b in cached:
                if b.ref_cnt == 0:
                    del self.free_queue[b.block_id]
                b.ref_cnt += 1
                seq.block_table.append(b.block_id)
            self._seq_hashes[seq.seq_id] = [b.block_hash for b in cached]  # type: ignore[misc]
            seq.num_computed_tokens = len(cached) * self.block_size
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(need):
            seq.block_table.append(self._take_free_block().block_id)
        return True

    def _take_free_block(self) -> KVBlock:
        _, b = self.free_queue.popitem(last=False)
        if b.block_hash is not None:  # evict: its old contents are about to be overwritten
            if self.cached.get(b.block_hash) is b:
                del self.cached[b.block_hash]
            b.block_hash = b.parent_hash = b.token_ids = None
        b.ref_cnt = 1
        return b

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the sequence's blocks that are now completely computed, so others can share them."""
        if not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        # A pending token (async scheduling) is computed but its id is not known yet: its block waits.
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        bs = self.block_size
        while len(hashes) < num_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            toks = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, toks)
            hashes.append(h)
            b = self.blocks[seq.block_table[i]]
            if b.block_hash is None and h not in self.cached:
                b.block_hash, b.parent_hash, b.token_ids = h, parent, toks
                self.cached[h] = b

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks; the tail goes to the free queue first, so it is evicted first."""
        for block_id in reversed(seq.block_table):
            b = self.blocks[block_id]
            b.ref_cnt -= 1
            assert b.ref_cnt >= 0, f"block {block_id} freed twice"
            if b.ref_cnt == 0:
                self.free_queue[block_id] = b
        seq.block_table = []
        self._seq_hashes.pop(seq.seq_id, None)

    def reset_prefix_cache(self) -> None:
        for b in self.free_queue.values():
            b.block_hash = b.parent_hash = b.token_ids = None
        self.cached = {h: b for h, b in self.cached.items() if b.ref_cnt > 0}
