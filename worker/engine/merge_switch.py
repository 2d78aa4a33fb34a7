"""The engine side of dLoRA's merged/unmerged switching: per step, the batch's composition in, the mode out.

Why here, in the runner's `prepare`: that is the one point between two steps where the next step's batch is known
and nothing of it is queued yet, so a merge or an unmerge can never land mid-step. On CUDA the merge's kernels are
queued on the compute stream behind the steps already queued (async scheduling included), so those read the
copy as it was when they were planned. The decision itself is the pure `merge_policy.decide`; this file turns the
live batch into its arguments, applies the result to `MergedWeights`, and keeps the merged version's GPU slot
pinned while merged (rows of other adapters subtract its delta from that slot's tensors).

Versions: the merged weights hold one `AdapterVersion`, and every row is served through its own version object,
so a step never mixes versions. A version is merged only while no other version of its adapter is in flight
(`mergeable`), and a retired merged version is unmerged as soon as a batch has none of its rows.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace

import torch
from lorafleet.worker.engine.scheduler import ScheduledBatch
from lorafleet.worker.lora.merge_policy import BatchMix, CostModel, Decision, PolicyState, decide, estimate_cost
from lorafleet.worker.lora.merged import MergedWeights
from lorafleet.worker.lora.store import AdapterStore, AdapterVersion


def batch_mix(batch: ScheduledBatch) -> BatchMix:
    """Rows (tokens this step) per adapter version, and rows without an adapter."""
    rows: dict[AdapterVersion, int] = {}
    base = 0
    for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
        av = seq.adapter
        if av is None:
            base += n
        else:
            rows[av] = rows.get(av, 0) + n
    return BatchMix(rows, base)


def measure_torch_pass(model, store: AdapterStore, repeats: int = 5) -> dict[str, float]:
    """`row_s`, `segment_s`, `pass_s` of the torch reference path, timed on this machine (a few ms at start).

    Why measured: on CPU a pass costs mostly its per-call dispatch (buffers, host copies of the segment bounds, one
    matmul pair per segment), which no flop count predicts. One projection is timed with 1 row in 1 segment, 64
    rows in 1 segment and 64 rows in 8 segments, on slot 0 (its values do not change the time), and scaled to all
    projections of all layers (rows by their flops)."""
    from lorafleet.worker.layers.lora_context import SegmentLoRAContext
    from lorafleet.worker.lora.merge_policy import PROJS

    shape = model.shape
    fin, fout = shape.proj_dims("q_proj")
    x = torch.zeros(64, fin, dtype=store.dtype, device=store.device)
    y = torch.zeros(64, fout, dtype=store.dtype, device=store.device)
    always_on = _AlwaysOn(store)

    def timed(indptr: list[int], rows: int) -> float:
        ctx = SegmentLoRAContext(always_on, torch.tensor(indptr), torch.zeros(len(indptr) - 1, dtype=torch.long))
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            ctx.apply(0, "q_proj", x[:rows], y[:rows])
            best = min(best, time.perf_counter() - t0)
        return best

    one = timed([0, 1], 1)
    wide = timed([0, 64], 64)
    split = timed(list(range(0, 65, 8)), 64)
    per_proj = len(PROJS) * shape.num_layers
    flops = sum(i + o for i, o in (shape.proj_dims(p) for p in PROJS)) / (fin + fout) * shape.num_layers
    return {
        "row_s": max(0.0, wide - one) / 63 * flops,
        "segment_s": max(0.0, split - wide) / 7 * per_proj,
        "pass_s": one * per_proj,
    }


class _AlwaysOn:
    """The store's slot tensors whether or not a resident adapter targets the projection (for timing)."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store
        self.scales = store.scales

    def stacked(self, layer_idx: int, proj: str, always: bool = False):
        return self.store.stacked(layer_idx, proj, always=True)


class _Mergeable:
    """`key in mergeable`: current (not retired), resident, and the only version of its adapter in flight.
    Lazy, because the policy asks about the top candidate only."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store
        self._in_flight: Counter[str] | None = None

    def __contains__(self, av: object) -> bool:
        if not isinstance(av, AdapterVersion) or av.retired or av.slot is None:
            return False
        if self._in_flight is None:
            self._in_flight = Counter(v.name for v in self.store.versions() if v.refs > 0)
        return self._in_flight[av.name] <= 1


class MergeSwitch:
    def __init__(self, model, store: AdapterStore, cost: CostModel | None = None) -> None:
        self.store = store
        self.weights = MergedWeights(model, store)
        cuda = store.device.type == "cuda"
        self.cost = cost or estimate_cost(model.shape, store.max_rank, cuda)
        if cost is None and not cuda:
            self.cost = replace(self.cost, **measure_torch_pass(model, store))
        self.state = PolicyState()
        self.last: Decision | None = None
        self.counters: Counter[str] = Counter()  # steps, merged_steps, merge, unmerge, forced
        self.held = False  # `hold`: the mode is fixed, the policy is not asked

    @property
    def merged(self) -> AdapterVersion | None:
        return self.weights.merged

    def plan(self, batch: ScheduledBatch) -> int | None:
        """Settles the mode of the step about to be built from `batch`; returns the merged slot, or None."""
        self.counters["steps"] += 1
        if not self.held:
            mix = batch_mix(batch)
            cur = self.weights.merged
            force = cur is not None and cur.retired and mix.rows.get(cur, 0) == 0
            d = decide(self.state, mix, self.cost, _Mergeable(self.store), force)
            if d.switched:
                self._switch(d.merged)
                self.counters[d.reason] += 1
            self.state, self.last = d.state, d
        merged = self.weights.merged
        if merged is None:
            return None
        self.counters["merged_steps"] += 1
        return merged.slot

    def _switch(self, target: AdapterVersion | None) -> None:
        cur = self.weights.merged
        if cur is not None:
            self.weights.unmerge()
            self.store.unpin(cur)
        if target is None:
            return
        self.store.pin(target)
        cuda = self.store.device.type == "cuda"
        t0 = time.perf_counter()
        self.weights.merge(target)
        if cuda:
            torch.cuda.synchronize(self.store.device)  # merges are rare (the credits pay for them): time them
        self.cost = replace(self.cost, merge_s=time.perf_counter() - t0)  # measured, for the next decisions

    def hold(self, target: AdapterVersion | None) -> None:
        """Serves `target` merged (None: unmerged) from the next step on, whatever the batches, until `release`:
        for A/B measurements and tests. Call it between steps."""
        if target is not self.weights.merged:
            self._switch(target)
        self.held = True
        self.state = PolicyState(target, {})

    def release(self) -> None:
        """The policy decides again from the next step on, starting from the current mode."""
        self.held = False
