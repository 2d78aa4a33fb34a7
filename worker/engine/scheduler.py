"""Continuous batching under a per-iteration token budget: decodes first, then prefill chunks, then admissions.

Why this order (vLLM v1 / Sarathi): running decodes cost one token each and keep latency steady; leftover budget
goes to partially prefilled prompts, then to new requests, chunked to fit. When KV blocks run out, the newest
running sequence is preempted by recompute: its blocks are freed and it goes back to the *front* of the waiting
queue with its generated tokens kept, so no request is lost.

Why slot-aware admission (dLoRA-style credits): with many more adapters than GPU slots, arrival order makes most
admissions wait for, or thrash, a slot (an H200 run with 512 adapters over 128 slots reached 0.40x of the
all-resident rate). So waiting requests whose adapter is already resident (or being prefetched), and base-model
requests, are admitted before cold ones. Age bounds the unfairness: a request that has waited more than
`max_wait_steps` passes goes first, in arrival order; if it cannot get a slot (all pinned), the pinned adapter that
drains soonest gets no new requests until its slot frees (one slot, not all: the rest of the batch keeps
flowing). After admission the adapters of the next cold requests are prefetched into free slots or slots no
waiting request wants.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lorafleet.worker.config import EngineConfig
from lorafleet.worker.engine.block_manager import BlockManager
from lorafleet.worker.engine.sequence import Sequence, SequenceStatus
from lorafleet.worker.lora.adapter import AdapterError
from lorafleet.worker.lora.store import AdapterStore, AdapterVersion


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
        self.slot_aware = config.lora_admission == "slot_aware"
        self.max_wait_steps = config.max_admission_wait_steps
        self.prefetch_depth = 4  # distinct cold adapters whose upload starts ahead of their admission
        self.passes = 0  # schedule() calls: the clock request ages are measured in

    def add(self, seq: Sequence) -> None:
        seq.enqueued_pass = self.passes
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
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING and seq in self.waiting:
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
        seq.enqueued_pass = self.passes - self.max_wait_steps - 1  # overdue at once: it goes first again
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        self.passes += 1
        batch = ScheduledBatch()
        budget = self.max_tokens
        decodes: list[Sequence] = []
        chunks: list[Sequence] = []
        for s in self.running:
            (decodes if len(s.token_ids) - s.num_computed_tokens == 1 else chunks).append(s)
        running = SequenceStatus.RUNNING
        block_size = self.bm.block_size
        for seq in decodes + chunks if chunks else decodes:
            if budget == 0:
                break
            if seq.status != running:
                continue
            n = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            fits = seq.num_computed_tokens + n <= len(seq.block_table) * block_size  # the common decode case
            while not fits and not self.bm.allocate_to(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                if victim in batch.seqs:
                    i = batch.seqs.index(victim)
                    budget += batch.num_tokens.pop(i)
                    batch.seqs.pop(i)
                self.preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != running:
                continue
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        if not batch.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            self._admit(batch, budget)
        return batch

    def _overdue(self, seq: Sequence) -> bool:
        return self.passes - seq.enqueued_pass > self.max_wait_steps

    def _admission_order(self) -> tuple[list[Sequence], set[AdapterVersion]]:
        """Overdue requests (arrival order), then warm ones (base model or adapter resident), then cold ones;
        plus the resident adapters that waiting requests want (evicted last)."""
        if not self.slot_aware:
            return list(self.waiting), set()
        overdue: list[Sequence] = []
        warm: list[Sequence] = []
        cold: list[Sequence] = []
        wanted: set[AdapterVersion] = set()
        limit = self.passes - self.max_wait_steps
        for seq in self.waiting:
            av = seq.adapter
            if seq.enqueued_pass < limit:
                overdue.append(seq)
            elif av is None:
                warm.append(seq)
            elif av.slot is not None:
                warm.append(seq)
                wanted.add(av)
            else:
                cold.append(seq)
        return overdue + warm + cold, wanted

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        order, wanted = self._admission_order()
        admitted = False
        reserved: set[AdapterVersion] = set()  # pinned adapters left to drain for overdue requests without a slot
        blocked = False  # arrival-order policy: a starving request stops every other adapter behind it
        for seq in order:
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            av = seq.adapter
            if av is not None:
                if blocked or av in reserved:
                    continue  # let that slot drain so the overdue request gets it
                try:
                    slot = self.store.ensure_slot(av, wanted)
                except AdapterError as exc:  # e.g. evicted from host memory and gone from disk since
                    batch.failed.append((seq, str(exc)))
                    self.finish(seq, "abort")
                    continue
                if slot is None:
                    seq.slot_waits += 1  # every slot is pinned by other adapters' running sequences
                    if not self.slot_aware:
                        blocked = seq.slot_waits > self.max_wait_steps
                    elif self._overdue(seq) and not reserved:
                        self._reserve_slot(reserved)  # one slot at a time: it goes to the oldest overdue request
                    continue
            self.bm.match_prefix(seq, seq.cache_salt)
            n = min(seq.num_remaining, budget)
            if not self.bm.allocate_to(seq, seq.num_computed_tokens + n):
                self.bm.free(seq)  # give back prefix-cache hits too; they stay cached
                seq.num_computed_tokens = 0
                break  # out of KV blocks: admit nobody else this step
            if av is not None:
                self.store.pin(av)
            seq.status = SequenceStatus.RUNNING
            seq.admitted_pass = self.passes
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
            admitted = True
        if admitted:
            self.waiting = deque(s for s in self.waiting if s.status == SequenceStatus.WAITING)

    def _reserve_slot(self, reserved: set[AdapterVersion]) -> None:
        """Stops admissions to the pinned adapter that drains soonest (fewest steps left among its running
        sequences), so one slot frees within a bounded number of steps while the other adapters keep flowing."""
        left: dict[AdapterVersion, int] = {}
        for s in self.running:
            av = s.adapter
            if av is not None and av not in reserved:
                steps = s.params.max_tokens - s.num_output_tokens + (s.num_remaining > 1)
                left[av] = max(left.get(av, 0), steps)
        if left:
            reserved.add(min(left, key=lambda a: left[a]))

    def prefetch(self) -> int:
        """Starts loading the adapters of the next cold waiting requests (oldest first) into free slots or slots
        no waiting request wants; returns how many uploads started. Arrival-order (fifo) admission prefetches the
        head of the queue only on CUDA, as before."""
        if not self.slot_aware:
            if self.store.device.type != "cuda":
                return 0
            heads = [s.adapter for s in list(self.waiting)[: self.prefetch_depth] if s.adapter is not None]
            return sum(1 for av in heads if av.slot is None and self.store.ensure_slot(av) is not None)
        if not self.waiting or self.store.free_slots() == 0:
            return 0  # every slot is pinned: nothing could be prefetched (cheap exit for a full batch)
        wanted = {s.adapter for s in self.waiting if s.adapter is not None and s.adapter.slot is not None}
        started = 0
        for seq in self.waiting:
            av = seq.adapter
            if av is None or av.slot is not None:
                continue
            try:
                if not self.store.prefetch(av, wanted):
                    break  # no slot is free or unwanted
            except AdapterError:
                continue  # admission reports it
            wanted.add(av)
            started += 1
            if started >= self.prefetch_depth:
                break
        return started
