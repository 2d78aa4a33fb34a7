"""Status: what the fleet writes on each LoRAAdapter and on the BaseModel, written only when it changed.

The content follows docs/operator.md (Status and conditions): phase, placements, rate, version and the Ready /
Placed / Degraded conditions of an adapter; ready workers, per-worker slots and the most actionable problem
(`basemodel_problem`) of the BaseModel. Each write is compared with the last one (times in conditions ignored), so
a steady fleet writes nothing; persistent failures reach the user once as an aggregated Event.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lorafleet.operator import conditions, podhealth
from lorafleet.operator import constants as c
from lorafleet.operator.capacity import worker_capacity
from lorafleet.operator.decide import AdapterView
from lorafleet.operator.observe import Worker
from lorafleet.operator.validation import Problem

if TYPE_CHECKING:
    from lorafleet.operator.fleet import BaseModelFleet


def _old_since(old_status: Mapping[str, Any], pod: str) -> str | None:
    for p in old_status.get("placements") or []:
        if p.get("pod") == pod:
            return p.get("since")
    return None


def _same_as_body(old: Mapping[str, Any], compare: Mapping[str, Any], conds: list[dict[str, Any]]) -> bool:
    return all(old.get(k) == v for k, v in compare.items()) and conditions.same_ignoring_time(
        old.get("conditions"), conds
    )


class StatusWriter:
    """The status writes of one fleet; remembers what it last wrote per object."""

    def __init__(self, fleet: BaseModelFleet) -> None:
        self.fleet = fleet
        self.last: dict[str, dict[str, Any]] = {}

    def forget(self, adapter: str) -> None:
        self.last.pop(adapter, None)

    async def adapters(self, views: dict[str, AdapterView], by_pod: dict[str, Worker]) -> None:
        for name, view in views.items():
            if view.deleting:
                continue
            body = view.body
            meta = body["metadata"]
            old = body.get("status") or {}
            routed = self.fleet.routes.get(name, [])
            placements = []
            for pod in routed:
                w = by_pod.get(pod)
                since = self.fleet.migrator.since.setdefault((name, pod), _old_since(old, pod) or conditions.now_iso())
                placements.append({"pod": pod, "node": (w.node if w else None) or "", "since": since, "ready": True})
            versions = {
                w.adapters[name].version
                for pod in routed
                if (w := by_pod.get(pod)) and w.adapters and name in w.adapters
            }
            conds = old.get("conditions") or []
            gen = meta.get("generation")
            fatal = view.fatal
            soft = [p for p in view.problems if not p.fatal]
            load_error = self.fleet.migrator.load_errors.get(name)
            if fatal:
                phase = "Failed"
                conds = conditions.set_condition(conds, "Ready", False, fatal.reason, fatal.message, gen)
                conds = conditions.set_condition(conds, "Placed", False, fatal.reason, fatal.message, gen)
                self.fleet.event(body, "Warning", fatal.reason, fatal.message)
            else:
                n = len(routed)
                if n == 0:
                    phase = "Pending" if not load_error else "Failed"
                    reason = "LoadFailed" if load_error else ("NoWorkers" if not by_pod else "Placing")
                    msg = load_error or "waiting for a worker to load the adapter"
                    conds = conditions.set_condition(conds, "Ready", False, reason, msg, gen)
                else:
                    phase = "Ready"
                    conds = conditions.set_condition(conds, "Ready", True, "Routable", f"served by {n} worker(s)", gen)
                placed = n >= view.desired and view.desired > 0
                conds = conditions.set_condition(
                    conds,
                    "Placed",
                    placed,
                    "ReplicasPlaced" if placed else "ReplicasPending",
                    f"{n}/{view.asked} replicas placed",
                    gen,
                )
            degraded = soft[0] if soft else None
            if degraded is None and load_error and not fatal:
                degraded = Problem("LoadFailed", load_error, fatal=False)
            if degraded is not None:
                conds = conditions.set_condition(conds, "Degraded", True, degraded.reason, degraded.message, gen)
                self.fleet.event(body, "Warning", degraded.reason, degraded.message)
            else:
                conds = conditions.set_condition(conds, "Degraded", False, "AsExpected", "", gen)
            status: dict[str, Any] = {
                "observedGeneration": gen,
                "phase": phase,
                "placements": placements,
                "requestRate": round(view.rate, 1),  # coarse: EWMA jitter must not cause a write every scrape
                "message": (fatal or degraded).message
                if (fatal or degraded)
                else f"{len(routed)}/{view.asked} replicas",
                "conditions": conds,
            }
            if versions - {None}:
                status["version"] = str(sorted(v for v in versions if v is not None)[-1])
            compare = {k: v for k, v in status.items() if k != "conditions"}
            last = self.last.get(name)
            if last is not None and last["cmp"] == compare and conditions.same_ignoring_time(last["conds"], conds):
                continue
            if last is None and _same_as_body(old, compare, conds):
                self.last[name] = {"cmp": compare, "conds": conds}
                continue
            await self.fleet.rt.kube.patch_status(c.ADAPTERS, self.fleet.ns, name, status)
            self.last[name] = {"cmp": compare, "conds": conds}

    async def basemodel(
        self,
        bm: Mapping[str, Any],
        workers: list[Worker],
        views: dict[str, AdapterView],
        pods: list[Mapping[str, Any]],
    ) -> None:
        spec = bm.get("spec") or {}
        meta = bm["metadata"]
        gen = meta.get("generation")
        ready = [w for w in workers if w.reachable and not w.draining]
        want = int(spec.get("replicas", 1))
        limits = spec.get("limits") or {}
        per_worker = []
        slots = worker_capacity(limits).slots
        for w in sorted(workers, key=lambda w: w.pod):
            count = len([a for a in (w.adapters or {}) if (w.adapters or {})[a].servable])
            self.fleet.rt.metrics.placements.labels(self.fleet.name, w.pod).set(count)
            per_worker.append(
                {
                    "pod": w.pod,
                    "node": w.node or "",
                    "ready": w.reachable and not w.draining,
                    "adapterSlots": slots,
                    "slotsUsed": count,
                    "load": round(w.load.total_rate, 3) if w.load else 0.0,
                }
            )
        self.fleet.rt.metrics.workers_ready.labels(self.fleet.name).set(len(ready))
        old = bm.get("status") or {}
        conds = old.get("conditions") or []
        if ready:
            conds = conditions.set_condition(
                conds, "Ready", True, "WorkersReady", f"{len(ready)}/{want} workers ready", gen
            )
        else:
            conds = conditions.set_condition(conds, "Ready", False, "NoReadyWorkers", f"0/{want} workers ready", gen)
        degraded = self.basemodel_problem(want, ready, pods)
        if degraded is not None and degraded.reason not in ("WorkersMissing", "ChildRejected"):
            self.fleet.event(bm, "Warning", degraded.reason, degraded.message)
        conds = conditions.set_condition(
            conds,
            "Degraded",
            degraded is not None,
            degraded.reason if degraded else "AsExpected",
            degraded.message if degraded else "",
            gen,
        )
        live = [v for v in views.values() if not v.deleting and not v.fatal]
        placed = len([v for v in live if self.fleet.routes.get(v.name)])
        msg = f"{placed}/{len(live)} adapters placed"
        if self.fleet.last_solve is not None:
            msg += f"; last rebalance {self.fleet.last_solve}"
        conds = conditions.set_condition(
            conds, "Placed", placed == len(live), "AllPlaced" if placed == len(live) else "Placing", msg, gen
        )
        status = {
            "observedGeneration": gen,
            "readyWorkers": len(ready),
            "workers": per_worker,
            "conditions": conds,
            "message": (degraded.message if degraded else f"{len(ready)}/{want} workers ready; {msg}")[:1024],
        }
        compare = {k: v for k, v in status.items() if k not in {"conditions", "workers"}}
        compare["workers"] = [{k: v for k, v in w.items() if k != "load"} for w in per_worker]
        last = self.last.get(f"\0bm:{self.fleet.name}")
        if last is not None and last["cmp"] == compare and conditions.same_ignoring_time(last["conds"], conds):
            if time.monotonic() - last["t"] < 30:
                return
        await self.fleet.rt.kube.patch_status(c.BASEMODELS, self.fleet.ns, self.fleet.name, status)
        self.last[f"\0bm:{self.fleet.name}"] = {"cmp": compare, "conds": conds, "t": time.monotonic()}

    def basemodel_problem(self, want: int, ready: list[Worker], pods: list[Mapping[str, Any]]) -> Problem | None:
        """What the BaseModel's Degraded condition says, most actionable first: a child the API server refused,
        then a worker pod that cannot start (unschedulable, image pull, crash loop), then missing workers."""
        if self.fleet.children.failures:
            first = self.fleet.children.failures[0]
            more = f" (+{len(self.fleet.children.failures) - 1} more)" if len(self.fleet.children.failures) > 1 else ""
            return Problem("ChildRejected", first.describe() + more, fatal=False)
        pod_issues = podhealth.pod_problems(pods)
        if pod_issues:
            return pod_issues[0]
        if len(ready) < want:
            return Problem("WorkersMissing", f"{want - len(ready)} worker(s) not ready", fatal=False)
        return None
