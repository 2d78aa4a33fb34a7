"""Paged KV cache bookkeeping: fixed-size blocks, an LRU free list, per-block ref counts, optional prefix caching.

Why ref counts: a block can be shared (prefix caching); it returns to the free list only when its last user
releases it. Allocation is all-or-nothing per call so a failed step leaves no half-grown block table.
Prefix caching (vLLM-style): every *full* block whose KV is computed gets a chained hash of (previous hash, salt,
its tokens), where the salt is the adapter version, because a LoRA changes every layer's K/V. A new request
reuses the longest run of cached blocks of its prompt. Freed blocks keep their hash until they are reallocated,
oldest-freed first, so recently used prefixes survive longest.
"""

from __future__ import annotations

from collections.abc import Hashable

from lorafleet.worker.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion order = eviction order
        self.hash_of: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.hit_tokens = 0  # prompt tokens served from the prefix cache (cumulative)

    @property
    def free_ids(self) -> list[int]:
        return list(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def _pop_free(self) -> int:
        b = next(iter(self._free))
        del self._free[b]
        h = self.hash_of[b]
        if h is not None:  # its cached contents are about to be overwritten
            if self.cached.get(h) == b:
                del self.cached[h]
            self.hash_of[b] = None
        return b

    def allocate_to(self, seq: Sequence, num_tokens: int) -> bool:
        """Grows `seq.block_table` to hold `num_tokens` tokens; False (and no change) if blocks are short."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            b = self._pop_free()
            assert self.ref_counts[b] == 0
            self.ref_counts[b] = 1
            seq.block_table.append(b)
        return True

    def free(self, seq: Sequence) -> None:
        for b in reversed(seq.block_table):  # the tail (least shareable) becomes the first to be evicted
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free[b] = None
        # a new list, never one shrunk in place: block tables only grow by append otherwise, and
        # engine/block_table.py tells a freed (and later refilled) table from a grown one by the list's identity
        seq.block_table = []
        seq.block_hashes = []

    # ---- prefix caching ------------------------------------------------------------------------------------------
    def _hash(self, prev: int | None, salt: Hashable, tokens: list[int]) -> int:
        return hash((prev, salt, tuple(tokens)))

    def match_prefix(self, seq: Sequence, salt: Hashable) -> int:
        """For a fresh sequence: takes the longest run of cached full blocks of its tokens (always leaving at least
        one token to compute, which produces the next logits); returns the number of tokens reused."""
        if not self.enable_prefix_caching or seq.block_table or seq.num_computed_tokens:
            return 0
        bs = self.block_size
        prev: int | None = None
        for i in range((seq.num_tokens - 1) // bs):
            h = self._hash(prev, salt, seq.token_ids[i * bs : (i + 1) * bs])
            b = self.cached.get(h)
            if b is None:
                break
            if self.ref_counts[b] == 0:
                del self._free[b]
            self.ref_counts[b] += 1
            seq.block_table.append(b)
            seq.block_hashes.append(h)
            prev = h
        n = len(seq.block_table) * bs
        seq.num_computed_tokens = n
        self.hit_tokens += n
        return n

    def commit(self, seq: Sequence, salt: Hashable) -> None:
        """Registers the blocks that became full and computed, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            prev = seq.block_hashes[-1] if seq.block_hashes else None
            h = self._hash(prev, salt, seq.token_ids[i * bs : (i + 1) * bs])
            seq.block_hashes.append(h)
            b = seq.block_table[i]
            if h not in self.cached and self.hash_of[b] is None:
                self.cached[h] = b
                self.hash_of[b] = h
