"""Periodic global rebalancing of one BaseModel's adapters: scrape → solve (OR-Tools) → diff → safe handoffs.

The fast path (`assign.plan`) only repairs; it never moves a healthy replica. This clock-driven path asks the
placement model for a better placement given measured per-adapter rates, and the model's hysteresis keeps small load
changes from moving anything. Each resulting move becomes a handoff executed by the fleet's next cycle (load on the
target, route, un-route the source, drain, unload), so rebalancing and failure repair share one code path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lorafleet.operator import assign
from lorafleet.operator.capacity import adapter_sizes, worker_capacity
from lorafleet.operator.validation import adapter_rank

if TYPE_CHECKING:
    from lorafleet.operator.fleet import BaseModelFleet

log = logging.getLogger(__name__)


class Rebalancer:
    def __init__(self, fleet: BaseModelFleet) -> None:
        self.fleet = fleet
        self.last = time.monotonic()
        self.last_result: Any = None

    def due(self) -> bool:
        interval = self.fleet.rt.config.rebalance_interval
        return interval > 0 and time.monotonic() - self.last >= interval

    async def run(self, bm: Mapping[str, Any], adapters: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
        self.last = time.monotonic()
        # CP-SAT may take up to its time limit: solve off the event loop so watches and handlers keep flowing.
        moves = await asyncio.to_thread(plan_moves, self.fleet, bm, adapters)
        self.last = time.monotonic()  # the interval runs from the end of a solve: a slow solve never repeats at once
        if moves is None:
            return []
        result, found = moves
        self.last_result = result
        self.fleet.rt.metrics.solve_seconds.labels(self.fleet.name, "rebalance").observe(result.solve_seconds)
        self.fleet.last_solve = (
            f"{result.status} in {result.solve_seconds * 1000:.0f} ms, max/mean load {result.max_over_mean:.2f}, "
            f"{len(found)} move(s)"
        )
        if found:
            log.info(
                "rebalance %s/%s: %s",
                self.fleet.ns,
                self.fleet.name,
                ", ".join(f"{a}: {s} -> {t}" for a, s, t in found),
            )
            self.fleet.moves_pending.extend(found)
            self.fleet.wake()
        return found


def plan_moves(
    fleet: BaseModelFleet, bm: Mapping[str, Any], adapters: list[dict[str, Any]]
) -> tuple[Any, list[tuple[str, str, str]]] | None:
    """Translates the fleet's observation into the placement model and its moves into (adapter, source, target)."""
    try:
        from lorafleet.operator.placement import Adapter, PlacementParams, Worker, diff, solve
    except ImportError:  # placement package not importable: the fast path still serves everything
        return None
    limits = (bm.get("spec") or {}).get("limits") or {}
    usable = [w for w in fleet.workers if w.reachable and not w.draining]
    if len(usable) < 2:
        return None
    cap = worker_capacity(limits)
    rates: dict[str, float] = {}
    for w in usable:
        for name, rate in (w.load.adapter_rate if w.load else {}).items():
            rates[name] = rates.get(name, 0.0) + rate
    workers = [
        Worker(
            name=w.pod,
            node=w.node or w.pod,
            memory_bytes=cap.memory_bytes,
            slots=cap.slots,
            max_rank=int(limits.get("maxRank") or 1 << 20),
        )
        for w in usable
    ]
    current: dict[str, set[str]] = {}
    sizes = adapter_sizes(adapters, [w.adapters for w in usable])
    models = []
    for body in adapters:
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            continue
        name = meta["name"]
        held = {w.pod for w in usable if w.holds(name)}
        if not held:
            continue  # not placed yet: the fast path owns it
        # the fleet's held decision (auto replicas with hysteresis), so the solver never argues with the fast path
        auto = fleet.autoscaler.held(name)
        want = (
            min(auto, len(usable))
            if auto is not None
            else assign.desired_replicas(
                body.get("spec") or {},
                rates.get(name, 0.0),
                len(usable),
                per_replica_rate=fleet.rt.config.per_replica_rate,
            )[0]
        )
        current[name] = held
        models.append(
            Adapter(
                name=name,
                size_bytes=sizes[name],
                rank=adapter_rank(body) or 8,
                rate=rates.get(name, 0.0),
                min_replicas=want,
                max_replicas=want,
                priority=int((body.get("spec") or {}).get("priority") or 0),
            )
        )
    if not models or sum(rates.values()) <= 1e-6:
        return None  # nothing measured: there is no load to balance, and moving replicas would only cost
    result = solve(workers, models, current, PlacementParams(time_limit_s=1.0))
    new = {a: set(ws) for a, ws in result.assignment.items()}
    found: list[tuple[str, str, str]] = []
    for move in diff(current, new):
        if move.add and move.remove:
            found.append((move.adapter, move.remove, move.add))
    return result, found
