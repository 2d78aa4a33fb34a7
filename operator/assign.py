"""Incremental replica assignment: the fast path that runs on every reconcile.

New adapters, replica changes and lost workers must be served within seconds, so this path never solves a global
model: it keeps every healthy placement, adds missing replicas on the least-loaded workers with room (spreading an
adapter's replicas over distinct nodes first), and drops surplus replicas from the most-loaded workers. Global
rebalancing (OR-Tools) is the rebalancer's job and runs on a slower clock.

"Room" is the rebalancer's capacity model (capacity.Capacity.fits): adapter slots *and* adapter-weight bytes, so a
new rank-256 adapter never lands on a worker whose `limits.adapterMemoryBytes` its neighbours already fill.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lorafleet.operator.capacity import UNLIMITED_BYTES, Capacity


@dataclass(frozen=True)
class WorkerSlot:
    """A worker that can take adapters right now."""

    name: str
    node: str | None = None
    capacity: int = 1_000_000  # adapter slots
    max_rank: int | None = None
    load: float = 0.0
    memory_bytes: int = UNLIMITED_BYTES  # adapter-weight budget

    @property
    def room(self) -> Capacity:
        return Capacity(slots=self.capacity, memory_bytes=self.memory_bytes)


@dataclass
class Plan:
    adds: list[tuple[str, str]] = field(default_factory=list)  # (adapter, worker)
    removes: list[tuple[str, str]] = field(default_factory=list)
    unplaceable: dict[str, int] = field(default_factory=dict)  # adapter -> replicas it could not get

    @property
    def empty(self) -> bool:
        return not self.adds and not self.removes


def plan(
    current: Mapping[str, set[str]],
    desired: Mapping[str, int],
    workers: list[WorkerSlot],
    *,
    rates: Mapping[str, float] | None = None,
    ranks: Mapping[str, int] | None = None,
    priority: Mapping[str, int] | None = None,
    blocked: Mapping[str, set[str]] | None = None,
    sizes: Mapping[str, int] | None = None,
) -> Plan:
    """Adds/removes that bring each adapter in `desired` to its replica count.

    `current` maps adapter -> workers serving it (only usable workers; others were already filtered out).
    `blocked` maps adapter -> workers it must not be added to (e.g. a worker refused it recently).
    `sizes` maps adapter -> bytes (capacity.adapter_sizes); an adapter without one costs 1 KiB, the solver's minimum.
    Adapters absent from `desired` are left alone.
    """
    rates = rates or {}
    ranks = ranks or {}
    priority = priority or {}
    blocked = blocked or {}
    sizes = sizes or {}
    by_name = {w.name: w for w in workers}
    room = {w.name: w.room for w in workers}
    holds: dict[str, dict[str, int]] = {w.name: {} for w in workers}  # worker -> adapter -> bytes
    load = {w.name: w.load for w in workers}
    for adapter, held in current.items():
        for w in held:
            if w in holds:
                holds[w][adapter] = sizes.get(adapter, 0)
    out = Plan()
    # Adapters that need replicas: highest priority, then busiest first, so scarce slots go where they matter.
    order = sorted(desired, key=lambda a: (-priority.get(a, 0), -rates.get(a, 0.0), a))
    for adapter in order:
        want = max(0, desired[adapter])
        held = {w for w in current.get(adapter, set()) if w in by_name}
        per_replica = rates.get(adapter, 0.0) / max(1, want)
        if len(held) > want:
            surplus = sorted(held, key=lambda w: (-load[w], -len(holds[w]), w))[: len(held) - want]
            for w in surplus:
                out.removes.append((adapter, w))
                del holds[w][adapter]
                load[w] -= per_replica
            continue
        missing = want - len(held)
        nodes = {by_name[w].node for w in held}
        size = sizes.get(adapter, 0)
        for _ in range(missing):
            candidates = [
                w
                for w in workers
                if w.name not in held
                and w.name not in blocked.get(adapter, set())
                and room[w.name].fits(holds[w.name].values(), size)
                and (w.max_rank is None or ranks.get(adapter, 0) <= w.max_rank)
            ]
            if not candidates:
                out.unplaceable[adapter] = out.unplaceable.get(adapter, 0) + 1
                continue
            # loads are rounded to 0.1 req/s so that trickle traffic does not outweigh the adapter count
            best = min(candidates, key=lambda w: (w.node in nodes, round(load[w.name], 1), len(holds[w.name]), w.name))
            out.adds.append((adapter, best.name))
            held.add(best.name)
            nodes.add(best.node)
            holds[best.name][adapter] = size
            load[best.name] += per_replica
    return out


def desired_replicas(spec: Mapping, rate: float, workers: int, *, per_replica_rate: float = 4.0) -> tuple[int, int]:
    """(replicas to run, replicas asked for). Fixed: `min` (at least 1); auto: ceil(rate / per-replica) in bounds."""
    rep = spec.get("replicas") or {}
    if isinstance(rep, int):
        lo = hi = rep
        auto = False
    else:
        lo = int(rep.get("min", 1) if rep.get("min") is not None else 1)
        hi = int(rep.get("max", lo) if rep.get("max") is not None else max(lo, 1))
        auto = bool(rep.get("auto", False))
    if auto:
        import math

        asked = min(max(lo, math.ceil(rate / per_replica_rate) if rate > 0 else lo, 1), max(hi, lo))
    else:
        asked = max(lo, 1) if lo > 0 else 0
    return min(asked, workers), asked
