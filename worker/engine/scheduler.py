"""Continuous batching under a per-iteration token budget: decodes first, then prefill chunks, then admissions.

Why this order (vLLM v1 / Sarathi): running decodes cost one token each and keep latency steady; leftover budget
goes to partially prefilled prompts, then to new requests, chunked to fit. When KV blocks run out, the newest
running sequence is preempted by recompute: its blocks are freed and it goes back to the *front* of the waiting
queue with its generated tokens kept, so no request is lost. A waiting request whose adapter cannot get a GPU slot
(all slots pinned by running sequences of other adapters) is skipped this step, not dropped; once it has been
skipped `max_slot_waits` times, requests for other adapters stop overtaking it, so the pinned slots drain and it
gets one (no starvation of a cold adapter behind hot ones; base-model requests still flow).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lorafleet.worker.config import EngineConfig
from lorafleet.worker.engine.block_manager import BlockManager
from lorafleet.worker.engine.sequence import Sequence, SequenceStatus
from lorafleet.worker.lora.adapter import AdapterError
from lorafleet.worker.lora.store import AdapterStore


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens computed for each sequence this step
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, str]] = field(default_factory=list)  # adapter could not be loaded: finish as abort

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, store: AdapterStore) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_tokens = config.max_num_batched_tokens
        self.bm = block_manager
        self.store = store
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.max_slot_waits = 16  # steps a request may be passed over for a GPU slot before others must wait

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, seq: Sequence) -> None:
        """Frees KV blocks and the adapter slot pin of a running sequence."""
        self.bm.free(seq)
        if seq.status == SequenceStatus.RUNNING and seq.adapter is not None:
            self.store.unpin(seq.adapter)

    def finish(self, seq: Sequence, reason: str) -> None:
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq.adapter is not None:
            self.store.release(seq.adapter)

    def preempt(self, seq: Sequence) -> None:
        self._release(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_tokens
        order = [s for s in self.running if s.num_remaining == 1] + [s for s in self.running if s.num_remaining > 1]
        for seq in order:
            if seq.status != SequenceStatus.RUNNING or budget == 0:
                continue
            n = min(seq.num_remaining, budget)
            while not self.bm.allocate_to(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                if victim in batch.seqs:
                    i = batch.seqs.index(victim)
                    budget += batch.num_tokens.pop(i)
                    batch.seqs.pop(i)
                self.preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        if not batch.preempted:
            self._admit(batch, budget)
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        i = 0
        starving = False  # a request has waited too long for a slot: stop admitting other adapters behind it
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[i]
            if seq.adapter is not None and starving:
                i += 1  # let the pinned slots drain so the starving request gets one
                continue
            if seq.adapter is not None:
                try:
                    slot = self.store.ensure_slot(seq.adapter)
                except AdapterError as exc:  # e.g. evicted from host memory and gone from disk since
                    batch.failed.append((seq, str(exc)))
                    self.finish(seq, "abort")
                    continue
                if slot is None:
                    seq.slot_waits += 1  # every slot is pinned by other adapters' running sequences
                    starving = seq.slot_waits > self.max_slot_waits
                    i += 1
                    continue
            self.bm.match_prefix(seq, seq.cache_salt)
            n = min(seq.num_remaining, budget)
            if not self.bm.allocate_to(seq, seq.num_computed_tokens + n):
                self.bm.free(seq)  # give back prefix-cache hits too; they stay cached
                seq.num_computed_tokens = 0
                break  # out of KV blocks: admit nobody else this step
            del self.waiting[i]
            if seq.adapter is not None:
                self.store.pin(seq.adapter)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
