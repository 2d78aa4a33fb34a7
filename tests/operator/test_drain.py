"""Drain before removal, under steady load: scale-down 3 -> 1 and pod deletion fail no request.

The operator picks the victims (pod-deletion-cost), empties them by safe handoff, and only then lets the Deployment
shrink; a deleted pod is un-routed and drained while its preStop hook (the local kubelet shim runs the same wait)
keeps the process up. Real API server, real ReplicaSet controller, real worker processes.
"""

from __future__ import annotations

import threading
from typing import Any

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


class SliceRecorder:
    """Every version of every `lora-*` EndpointSlice in the namespace, from a watch on the real API server:
    (resourceVersion, slice, pods listed). Watch events arrive in etcd order, so a version recorded after the
    pod's deletion event was written after the deletion."""

    def __init__(self, fleet: LocalFleet) -> None:
        self.fleet = fleet
        self.versions: list[tuple[int, str, set[str]]] = []
        self.deleted_at: dict[str, int] = {}  # pod -> resourceVersion of its first event with a deletionTimestamp
        self._stop = threading.Event()
        slices = (
            fleet.discovery.list_namespaced_endpoint_slice,
            "endpointslice.kubernetes.io/managed-by=lorafleet-operator",
        )
        pods = (fleet.core.list_namespaced_pod, f"{c.LABEL_BASEMODEL}={BM}")
        self._threads = [
            threading.Thread(target=self._follow, args=(*slices, self._slice), daemon=True),
            threading.Thread(target=self._follow, args=(*pods, self._pod), daemon=True),
        ]

    def _follow(self, fn: Any, selector: str, on: Any) -> None:
        """Watches until stopped; a dropped watch is started again (its initial list repeats versions, harmless)."""
        from kubernetes import watch

        while not self._stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(fn, self.fleet.namespace, label_selector=selector, timeout_seconds=5):
                    on(ev["object"])
                    if self._stop.is_set():
                        break
            except Exception:  # noqa: BLE001 - a dropped connection: watch again
                pass
            finally:
                w.stop()

    def _slice(self, sl: Any) -> None:
        pods = {e.target_ref.name for e in sl.endpoints or [] if e.target_ref}
        self.versions.append((int(sl.metadata.resource_version), sl.metadata.name, pods))

    def _pod(self, pod: Any) -> None:
        if pod.metadata.deletion_timestamp and pod.metadata.name not in self.deleted_at:
            self.deleted_at[pod.metadata.name] = int(pod.metadata.resource_version)

    def __enter__(self) -> SliceRecorder:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def listing(self, pod: str, after: int) -> list[tuple[int, str, set[str]]]:
        return [v for v in self.versions if v[0] > after and pod in v[2]]


def test_deleted_pod_is_drained_before_it_stops_under_load_and_never_routed_while_terminating(
    fleet: LocalFleet,
) -> None:
    fleet.patch(c.BASEMODELS, BM, {"spec": {"replicas": 2}})
    wait_for(lambda: _ready(fleet, 2), 240, 0.5, "2 workers")
    streams = [StreamingRouter(fleet, name, concurrency=1) for name in NAMES]
    for s in streams:
        s.__enter__()
    try:
        with SliceRecorder(fleet) as rec:
            wait_for(lambda: all(s.ok >= 3 for s in streams), 60, 0.1, "streams warmed up")
            wait_for(lambda: len(rec.versions) >= len(NAMES), 30, 0.1, "slices listed")  # the watch's initial list
            victim = fleet.routes(NAMES[0])[0][0]
            fleet.core.delete_namespaced_pod(victim, fleet.namespace)  # the pod's own grace period, as kubectl does
            wait_for(lambda: victim in rec.deleted_at, 30, 0.05, "deletion seen")
            for name in NAMES:
                wait_for(lambda name=name: victim not in {p for p, _ in fleet.routes(name)}, 60, 0.1, f"{name} moved")
            # the pod stays Terminating (its preStop drain and the shim's finalizer hold it) until it is empty
            wait_for(lambda: victim not in {p.metadata.name for p in fleet.worker_pods(BM)}, 60, 0.2, "victim gone")
            before = [s.ok for s in streams]
            wait_for(lambda: all(s.ok >= b + 3 for s, b in zip(streams, before, strict=True)), 60, 0.1, "streams go on")
        # no slice version written after the deletion names the terminating pod
        assert rec.listing(victim, rec.deleted_at[victim]) == []
        assert any(v[0] > rec.deleted_at[victim] for v in rec.versions)  # the slices were rewritten meanwhile
    finally:
        for s in streams:
            s.__exit__(None, None, None)
    for s in streams:
        assert s.failed == [], s.failed[:5]
