"""Drain before removal, under steady load: scale-down 3 -> 1 and pod deletion fail no request.

The operator picks the victims (pod-deletion-cost), empties them by safe handoff, and only then lets the Deployment
shrink; a deleted pod is un-routed and drained while its preStop hook (the local kubelet shim runs the same wait)
keeps the process up. Real API server, real ReplicaSet controller, real worker processes.
"""

from __future__ import annotations

import pytest
from lorafleet.operator import constants as c
from lorafleet.operator.scaledown import DELETION_COST, VICTIM_COST

from lorafleet.local.harness import LocalFleet, StreamingRouter, wait_for
from lorafleet.local.samples import adapter, basemodel

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]

BM = "drainer"
NAMES = ("dr-a", "dr-b", "dr-c")


def _ready(fleet: LocalFleet, n: int) -> bool:
    return (fleet.get(c.BASEMODELS, BM).get("status") or {}).get("readyWorkers") == n


def test_scale_down_three_to_one_under_load_fails_nothing(fleet: LocalFleet, tiny_assets) -> None:
    fleet.create(c.BASEMODELS, basemodel(BM, tiny_assets["model"], replicas=3))
    wait_for(lambda: _ready(fleet, 3), 240, 0.5, "3 workers")
    for i, name in enumerate(NAMES):
        fleet.create(c.ADAPTERS, adapter(name, BM, tiny_assets[("r4", "r8", "r16")[i]], replicas=1))
    for name in NAMES:
        wait_for(lambda name=name: fleet.serves(name), 60, 0.2, f"{name} serving")
    placed = {p for name in NAMES for p, _ in fleet.routes(name)}
    streams = [StreamingRouter(fleet, name, concurrency=1) for name in NAMES]
    for s in streams:
        s.__enter__()
    try:
        wait_for(lambda: all(s.ok >= 3 for s in streams), 60, 0.1, "streams warmed up")
        victims_seen: set[str] = set()

        def shrunk() -> bool:
            for p in fleet.core.list_namespaced_pod(fleet.namespace, label_selector=f"{c.LABEL_BASEMODEL}={BM}").items:
                if (p.metadata.annotations or {}).get(DELETION_COST) == VICTIM_COST:
                    victims_seen.add(p.metadata.name)
            return len(fleet.worker_pods(BM)) == 1

        fleet.patch(c.BASEMODELS, BM, {"spec": {"replicas": 1}})
        wait_for(shrunk, 120, 0.2, "one worker left")
        (survivor,) = [p.metadata.name for p in fleet.worker_pods(BM)]
        assert survivor not in victims_seen and len(victims_seen) == 2  # the operator chose, the ReplicaSet obeyed
        assert len(placed) >= 2  # the adapters really had to move
        for name in NAMES:
            wait_for(lambda name=name: [p for p, _ in fleet.routes(name)] == [survivor], 30, 0.1, f"{name} moved")
        before = [s.ok for s in streams]
        wait_for(lambda: all(s.ok >= b + 3 for s, b in zip(streams, before, strict=True)), 60, 0.1, "streams go on")
    finally:
        for s in streams:
            s.__exit__(None, None, None)
    for s in streams:
        assert s.failed == [], s.failed[:5]
    reasons = {e.reason for e in fleet.events_for(BM)}
    assert "ScalingDown" in reasons


def test_deleted_pod_is_drained_before_it_stops_under_load(fleet: LocalFleet) -> None:
    fleet.patch(c.BASEMODELS, BM, {"spec": {"replicas": 2}})
    wait_for(lambda: _ready(fleet, 2), 240, 0.5, "2 workers")
    streams = [StreamingRouter(fleet, name, concurrency=1) for name in NAMES]
    for s in streams:
        s.__enter__()
    try:
        wait_for(lambda: all(s.ok >= 3 for s in streams), 60, 0.1, "streams warmed up")
        victim = fleet.routes(NAMES[0])[0][0]
        fleet.core.delete_namespaced_pod(victim, fleet.namespace)  # the pod's own grace period, as kubectl does
        for name in NAMES:
            wait_for(lambda name=name: victim not in {p for p, _ in fleet.routes(name)}, 60, 0.1, f"{name} moved")
        wait_for(lambda: victim not in {p.metadata.name for p in fleet.worker_pods(BM)}, 60, 0.2, "victim gone")
        before = [s.ok for s in streams]
        wait_for(lambda: all(s.ok >= b + 3 for s, b in zip(streams, before, strict=True)), 60, 0.1, "streams go on")
    finally:
        for s in streams:
            s.__exit__(None, None, None)
    for s in streams:
        assert s.failed == [], s.failed[:5]
