"""Turns Worker/Adapter dataclasses into an indexed numeric problem, decides replica counts and static infeasibility.

Replica counts are fixed *before* the assignment is solved (the task allowed either): the count follows from the
adapter's rate and bounds alone, so each replica's load share rate/r is a constant and worker load stays linear in the
0/1 assignment variables. Letting CP-SAT pick r_a would need a product (share = rate / r_a) linearised per candidate
worker, many more variables for the same answer in practice (more replicas of a hot adapter always help balance, so the
solver would push r_a to its upper bound anyway). Auto replica counts get the same hysteresis band as the placement, so
a rate hovering at a threshold does not add and drop a replica on every rebalance.

Only ready workers with at least one slot take part; everything is indexed by position for numpy/CP-SAT speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from lorafleet.operator.placement.types import Adapter, PlacementParams, Worker

_KIB = 1024
# Scaled loads: the total load of the fleet maps to this many integer units (CP-SAT needs integer coefficients).
LOAD_UNITS = 10_000_000


@dataclass
class Problem:
    """The indexed problem. Worker arrays have length W (usable workers), adapter arrays length A."""

    workers: list[Worker]  # usable workers (ready, slots > 0), index = position
    adapters: list[Adapter]
    node: np.ndarray  # int, node id per worker
    mem_kib: np.ndarray  # int64, memory budget in KiB (floored)
    slots: np.ndarray  # int64
    base: np.ndarray  # float, baseline load
    size_kib: np.ndarray  # int64, adapter size in KiB (ceiled)
    replicas: np.ndarray  # int64, target replica count after capping to eligible workers
    share: np.ndarray  # float, rate per replica
    eligible: np.ndarray  # bool [A, W]: rank, memory and readiness allow the adapter on the worker
    current: list[set[int]]  # per adapter: usable current workers (eligible ones only)
    current_names: list[set[str]]  # per adapter: every current worker name, as given
    unplaced: dict[str, str]  # adapter name -> reason, static causes (more replicas than workers, rank, size)
    scale: float  # float load * scale = integer load units

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    @property
    def num_adapters(self) -> int:
        return len(self.adapters)

    def int_base(self) -> np.ndarray:
        return np.rint(self.base * self.scale).astype(np.int64)

    def int_share(self) -> np.ndarray:
        return np.rint(self.share * self.scale).astype(np.int64)


def desired_replicas(adapter: Adapter, current_count: int, params: PlacementParams) -> int:
    """Replica count for one adapter: fixed (min_replicas) or from its rate, with a hysteresis band.

    An auto adapter keeps its current count c while rate stays in ((c-1)*t/(1+h), c*t*(1+h)], t the per-replica target
    rate, h the hysteresis, so only a clear rate change resizes it.
    """
    lo, hi = max(0, adapter.min_replicas), max(adapter.min_replicas, adapter.max_replicas)
    target = params.per_replica_target_rate
    if not adapter.auto or target <= 0:
        return lo
    want = min(hi, max(lo, math.ceil(adapter.rate / target - 1e-9)))
    h = max(0.0, params.hysteresis)
    c = current_count
    if lo <= c <= hi and c > 0 and (c - 1) * target / (1 + h) < adapter.rate <= c * target * (1 + h):
        return c
    return want


def _static_reason(adapter: Adapter, workers: list[Worker], usable: list[Worker]) -> str:
    """Why no usable worker can hold this adapter at all, in words for a status condition / Event."""
    ready = [w for w in workers if w.ready]
    if not ready:
        return "NoReadyWorkers: no worker is ready"
    if not usable:
        return "NoSlots: no ready worker has an adapter slot"
    top_rank = max(w.max_rank for w in usable)
    if adapter.rank > top_rank:
        return f"RankTooHigh: rank {adapter.rank} exceeds every ready worker's max rank (largest {top_rank})"
    top_mem = max(w.memory_bytes for w in usable)
    if adapter.size_bytes > top_mem:
        return f"TooLarge: {adapter.size_bytes} bytes exceed every ready worker's adapter memory (largest {top_mem})"
    return "NoEligibleWorker: no ready worker allows both its rank and its size"


def build_problem(
    workers: list[Worker],
    adapters: list[Adapter],
    current: dict[str, set[str]] | None,
    params: PlacementParams,
) -> Problem:
    """Index the inputs, fix replica counts, find adapters that cannot be placed whatever the solver does."""
    current = current or {}
    usable = [w for w in workers if w.ready and w.slots > 0 and w.memory_bytes > 0]
    index = {w.name: i for i, w in enumerate(usable)}
    node_ids: dict[str, int] = {}
    node = np.array([node_ids.setdefault(w.node, len(node_ids)) for w in usable], dtype=np.int64)
    mem_kib = np.array([w.memory_bytes // _KIB for w in usable], dtype=np.int64)
    slots = np.array([w.slots for w in usable], dtype=np.int64)
    max_rank = np.array([w.max_rank for w in usable], dtype=np.int64)
    base = np.array([max(0.0, float(w.load)) for w in usable], dtype=np.float64)

    n_a = len(adapters)
    size_kib = np.array([max(1, -(-a.size_bytes // _KIB)) for a in adapters], dtype=np.int64)
    rank = np.array([a.rank for a in adapters], dtype=np.int64)
    eligible = (rank[:, None] <= max_rank[None, :]) & (size_kib[:, None] <= mem_kib[None, :])
    replicas = np.zeros(n_a, dtype=np.int64)
    share = np.zeros(n_a, dtype=np.float64)
    cur_idx: list[set[int]] = []
    cur_names: list[set[str]] = []
    unplaced: dict[str, str] = {}
    for i, a in enumerate(adapters):
        names = set(current.get(a.name, set()))
        cur_names.append(names)
        cur_idx.append({index[n] for n in names if n in index and eligible[i, index[n]]})
        want = desired_replicas(a, len(names), params)
        n_el = int(eligible[i].sum())
        if want > 0 and n_el == 0:
            unplaced[a.name] = _static_reason(a, workers, usable)
        elif want > n_el:
            unplaced[a.name] = f"TooManyReplicas: wants {want} replicas but only {n_el} ready workers can hold it"
        replicas[i] = min(want, n_el)
        share[i] = max(0.0, float(a.rate)) / replicas[i] if replicas[i] > 0 else 0.0

    total = float(base.sum() + (share * replicas).sum())
    scale = LOAD_UNITS / total if total > 0 else 1.0
    return Problem(
        workers=usable,
        adapters=list(adapters),
        node=node,
        mem_kib=mem_kib,
        slots=slots,
        base=base,
        size_kib=size_kib,
        replicas=replicas,
        share=share,
        eligible=eligible,
        current=cur_idx,
        current_names=cur_names,
        unplaced=unplaced,
        scale=scale,
    )
