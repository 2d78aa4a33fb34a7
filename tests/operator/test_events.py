"""Event aggregation: one object per (object, type, reason, message), repeats counted, writes throttled."""

from __future__ import annotations

import asyncio
from typing import Any

from lorafleet.operator.events import EventRecorder, event_body, event_name

BM = {
    "apiVersion": "lorafleet.io/v1alpha1",
    "kind": "BaseModel",
    "metadata": {"name": "m", "namespace": "ns", "uid": "u"},
}


def test_the_name_follows_what_the_event_says() -> None:
    a = event_name(BM, "Warning", "ChildRejected", "Deployment m-worker refused")
    assert a == event_name(BM, "Warning", "ChildRejected", "Deployment m-worker refused")
    assert a.startswith("m.") and len(a) == len("m.") + 16
    assert a != event_name(BM, "Warning", "ChildRejected", "Service m-worker refused")
    other = {**BM, "metadata": {**BM["metadata"], "uid": "u2"}}  # a recreated object gets its own series
    assert a != event_name(other, "Warning", "ChildRejected", "Deployment m-worker refused")
    body = event_body(BM, "Warning", "ChildRejected", "x" * 5000, count=2, now="2026-01-01T00:00:00Z")
    assert body["involvedObject"] == {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "BaseModel",
        "name": "m",
        "namespace": "ns",
        "uid": "u",
    }
    assert (body["count"], len(body["message"]), body["type"]) == (2, 1024, "Warning")


class FakeKube:
    """Records what the recorder asks the API server for (the real writes are tested in test_drift/test_refusals)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def record_event(self, body: dict[str, Any], delta: int) -> None:
        self.calls.append((body["metadata"]["name"], delta))


def test_repeats_within_the_interval_are_counted_not_written() -> None:
    kube = FakeKube()

    async def run() -> None:
        rec = EventRecorder(kube, every=3600.0)  # type: ignore[arg-type]
        for _ in range(5):
            rec.emit(BM, "Warning", "ChildRejected", "same")
        await rec.drain()
        rec.every = 0.0
        rec.emit(BM, "Warning", "ChildRejected", "same")  # the next write carries the 4 counted meanwhile + itself
        await rec.drain()

    asyncio.run(run())
    name = event_name(BM, "Warning", "ChildRejected", "same")
    assert kube.calls == [(name, 1), (name, 5)]
