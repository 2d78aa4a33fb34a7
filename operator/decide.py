"""Decide: from one cycle's observation to what the fleet does, as pure functions (no I/O, no clocks read).

`views` says what each adapter wants (validation, replica count), `held` what serves now, `plan` which replicas to
add and drop (`assign.plan` plus the rebalancer's moves), and `routing` what every adapter's EndpointSlice lists
after the loads and which replicas are released to drain. The fleet (`fleet.py`) only carries these out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lorafleet.operator import assign
from lorafleet.operator import constants as c
from lorafleet.operator.autoscale import AutoScaler
from lorafleet.operator.capacity import adapter_sizes, worker_capacity
from lorafleet.operator.observe import Worker
from lorafleet.operator.validation import (
    Problem,
    adapter_path,
    adapter_rank,
    published_versions,
    same_form,
    validate_adapter,
)

Pair = tuple[str, str]  # (adapter, pod)
Move = tuple[str, str, str]  # (adapter, source pod, target pod)


@dataclass
class AdapterView:
    """What one cycle decided about one adapter; becomes its status."""

    body: dict[str, Any]
    problems: list[Problem] = field(default_factory=list)
    desired: int = 0
    asked: int = 0
    deleting: bool = False
    rate: float = 0.0

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]

    @property
    def fatal(self) -> Problem | None:
        return next((p for p in self.problems if p.fatal), None)

    @property
    def removed(self) -> bool:
        """Nothing may serve it: being deleted, or refused by validation."""
        return self.deleting or self.fatal is not None


def source_path(body: Mapping[str, Any], adapter_root: str) -> str:
    """Where an adapter's weights come from now: a pinned published version (`spec.version`; '' when it was never
    published), else the newest version a ContinualLearningJob published, else the spec's source."""
    pin = (body.get("spec") or {}).get("version")
    if pin:
        return published_versions(body).get(str(pin), "")
    published = (body["metadata"].get("annotations") or {}).get(c.ANNOT_PUBLISHED_SOURCE)
    if published:
        return published
    return adapter_path(str(((body.get("spec") or {}).get("source") or {}).get("uri", "")), adapter_root)


def observed_rank(name: str, path: str, workers: list[Worker], memory: dict[Pair, int]) -> int | None:
    """The rank a worker reported for this source, remembered per (adapter, source) in `memory`, so an adapter
    unloaded for a wrong rank is not loaded again just to find out once more."""
    for w in workers:
        info = (w.adapters or {}).get(name)
        if info is not None and info.rank and (not info.path or info.path == path):
            memory[(name, path)] = int(info.rank)
    return memory.get((name, path))


def views(
    bodies: list[dict[str, Any]],
    bm: Mapping[str, Any],
    workers: list[Worker],
    usable: int,
    *,
    autoscaler: AutoScaler,
    check_sources: bool,
    rank_of: Callable[[dict[str, Any]], int | None],
    now: float,
) -> dict[str, AdapterView]:
    out: dict[str, AdapterView] = {}
    for body in bodies:
        view = AdapterView(body=body, deleting=bool(body["metadata"].get("deletionTimestamp")))
        view.rate = sum((w.load.adapter_rate.get(view.name, 0.0) if w.load else 0.0) for w in workers)
        view.problems = validate_adapter(
            body,
            bm,
            workers=int((bm.get("spec") or {}).get("replicas", 1)),
            check_local_sources=check_sources,
            observed_rank=rank_of(body),
        )
        if not view.removed:
            view.desired, view.asked = autoscaler.decide(view.name, body.get("spec") or {}, view.rate, usable, now)
        else:
            autoscaler.forget(view.name)
        out[view.name] = view
    return out


def held(views: Mapping[str, AdapterView], usable: list[Worker], draining: set[Pair]) -> dict[str, set[str]]:
    """Pods serving each adapter now (a replica being drained no longer counts)."""
    return {n: {w.pod for w in usable if w.holds(n) and (n, w.pod) not in draining} for n in views}


def valid_moves(
    moves: list[Move], views: Mapping[str, AdapterView], current: Mapping[str, set[str]], usable: list[Worker]
) -> list[Move]:
    """Rebalancer moves still meaningful this cycle: the source still serves, the target is usable and lacks it."""
    pods = {w.pod for w in usable}
    return [
        (a, src, dst)
        for a, src, dst in moves
        if a in views and src in current.get(a, set()) and dst in pods and dst not in current[a]
    ]


def plan(
    views: Mapping[str, AdapterView],
    current: dict[str, set[str]],
    usable: list[Worker],
    limits: Mapping[str, Any],
    blocked: dict[str, set[str]],
    bodies: list[dict[str, Any]],
) -> assign.Plan:
    """The fast path: keep healthy replicas, add missing ones, drop surplus, within slot and memory capacity."""
    room = worker_capacity(limits)
    slots = [
        assign.WorkerSlot(
            name=w.pod,
            node=w.node,
            capacity=0 if w.stale else room.slots,  # a timing-out worker keeps what it has, takes nothing new
            memory_bytes=room.memory_bytes,
            max_rank=int(limits["maxRank"]) if limits.get("maxRank") else None,
            load=(w.load.total_rate if w.load else 0.0),
        )
        for w in usable
    ]
    return assign.plan(
        current,
        {n: v.desired for n, v in views.items()},
        slots,
        rates={n: v.rate for n, v in views.items()},
        ranks={n: adapter_rank(v.body) or 0 for n, v in views.items()},
        priority={n: int((v.body.get("spec") or {}).get("priority") or 0) for n, v in views.items()},
        blocked=blocked,
        sizes=adapter_sizes(bodies, [w.adapters for w in usable]),
    )


@dataclass
class Routing:
    targets: dict[str, list[str]]  # adapter -> the pods its EndpointSlice lists (sorted)
    releases: list[tuple[str, str, str]]  # (adapter, pod, reason): un-routed now, to drain and unload


def routing(
    views: Mapping[str, AdapterView],
    workers: list[Worker],
    current: dict[str, set[str]],
    removes: list[Pair],
    draining: set[Pair],
    scale_removes: set[Pair],
) -> Routing:
    """Steps (2)+(3) of the handoff for every adapter at once, given what is loaded now (`current`).

    A terminating pod (deletionTimestamp) is never a target: its replicas are released at once (the preStop hook
    keeps the process up while they drain). A worker drained by annotation or picked by the scale-down plan keeps
    serving an adapter until another pod serves it. Removed adapters (deleting, invalid) are routed nowhere.
    """
    current = {a: set(pods) for a, pods in current.items()}
    by_pod = {w.pod: w for w in workers}
    releases: list[Pair] = list(removes)
    for w in workers:
        if not w.draining or not w.adapters:
            continue
        for a in w.adapters:
            if a not in views or (a, w.pod) in draining or not w.holds(a):
                continue
            if w.terminating or current.get(a) or views[a].removed:
                releases.append((a, w.pod))
            else:
                current.setdefault(a, set()).add(w.pod)  # keep serving until a replacement exists
    targets: dict[str, list[str]] = {}
    removing = set(removes)
    for name, view in views.items():
        if view.removed:
            targets[name] = []
            releases.extend((name, w.pod) for w in workers if w.holds(name) and (name, w.pod) not in draining)
            continue
        targets[name] = sorted(p for p in current.get(name, set()) if (name, p) not in removing)
    out = []
    for a, pod in dict.fromkeys(releases):
        if (a, pod) in draining:
            continue
        w = by_pod.get(pod)
        view = views[a]
        if view.deleting:
            reason = "deleted"
        elif view.fatal:
            reason = "invalid"
        elif w and w.draining:
            reason = "drain"
        elif (a, pod) in scale_removes:
            reason = "scale-down"
        else:
            reason = "rebalance"
        out.append((a, pod, reason))
    return Routing(targets, out)


def reload_path(info_path: str | None, want: str) -> bool:
    """Whether a replica loaded from `info_path` must be reloaded in place to serve `want` (store URIs compared as
    they are: `validation.same_form`)."""
    return bool(info_path) and same_form(str(info_path)) != same_form(want)
