"""Kubernetes Events the way kubelet and the controllers write them: one object per (object, type, reason, message),
aggregated by count.

A failure that repeats every reconcile cycle must not become an Event object per cycle (an Event storm hides the
one line a user needs). The Event name is derived from what it says, so a repeat, also after an operator restart,
finds the same object and increments its `count`; repeats within `every` seconds only bump the count in memory and
are written with the next repeat after that (the API server sees at most one write per Event per `every` seconds).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorafleet.operator import constants as c
from lorafleet.operator.conditions import now_iso

if TYPE_CHECKING:
    from lorafleet.operator.kube import Kube

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 1024


def event_name(involved: Mapping[str, Any], type_: str, reason: str, message: str) -> str:
    """`<object>.<16 hex>`: the same object, type, reason and message always name the same Event."""
    meta = involved["metadata"]
    key = "\0".join([str(meta.get("uid") or meta["name"]), type_, reason, message])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{str(meta['name'])[:200]}.{digest}"


def event_body(involved: Mapping[str, Any], type_: str, reason: str, message: str, *, count: int, now: str) -> dict:
    """A core/v1 Event about `involved` (a CR body or any object with apiVersion/kind/metadata)."""
    meta = involved["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": event_name(involved, type_, reason, message), "namespace": meta.get("namespace")},
        "involvedObject": {
            "apiVersion": involved.get("apiVersion", c.API_VERSION),
            "kind": involved.get("kind"),
            "name": meta["name"],
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:MESSAGE_LIMIT],
        "source": {"component": c.MANAGER},
        "reportingComponent": c.MANAGER,
        "count": count,
        "firstTimestamp": now,
        "lastTimestamp": now,
    }


@dataclass
class _Series:
    name: str
    namespace: str
    pending: int  # occurrences not yet added to the Event's count
    written: float  # monotonic time of the last write


class EventRecorder:
    """Posts aggregated Events in the background; `emit` never blocks or raises (Events are best effort)."""

    def __init__(self, kube: Kube, *, every: float = 30.0) -> None:
        self.kube = kube
        self.every = every
        self._series: dict[str, _Series] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def emit(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        message = message[:MESSAGE_LIMIT]
        name = event_name(involved, type_, reason, message)
        ns = str(involved["metadata"].get("namespace") or "default")
        key = f"{ns}/{name}"
        now = time.monotonic()
        series = self._series.get(key)
        if series is not None:
            series.pending += 1
            if now - series.written < self.every:
                return
            series.written = now
        else:
            if len(self._series) > 20000:
                self._series.clear()
            series = self._series[key] = _Series(name, ns, 1, now)
        delta, series.pending = series.pending, 0
        body = event_body(involved, type_, reason, message, count=delta, now=now_iso())
        try:
            task = asyncio.get_running_loop().create_task(self._write(body, delta))
        except RuntimeError:  # no running loop (a unit test calling a decision directly)
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, body: dict[str, Any], delta: int) -> None:
        try:
            await self.kube.record_event(body, delta)
        except Exception as exc:  # noqa: BLE001 - an Event must never break a reconcile
            log.debug("event %s not written: %s", body["metadata"]["name"], exc)

    async def drain(self) -> None:
        """Waits for pending writes (shutdown, tests)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
