"""Paged KV cache bookkeeping: fixed-size blocks, a free list and per-block reference counts.

Why ref counts: a block can be shared (prefix sharing, forks); it returns to the free list only when its last
user releases it. Allocation is all-or-nothing per call so a failed step leaves no half-grown block table.
"""

from __future__ import annotations

from collections import deque

from lorafleet.worker.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def allocate_to(self, seq: Sequence, num_tokens: int) -> bool:
        """Grows `seq.block_table` to hold `num_tokens` tokens; False (and no change) if blocks are short."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free_ids):
            return False
        for _ in range(need):
            b = self.free_ids.popleft()
            assert self.ref_counts[b] == 0
            self.ref_counts[b] = 1
            seq.block_table.append(b)
        return True

    def free(self, seq: Sequence) -> None:
        for b in reversed(seq.block_table):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_ids.append(b)
        seq.block_table = []
