"""Observe: what is true now about one BaseModel's workers, from the pods the API server lists and each worker's
own answers (`/v1/adapters`, `/metrics` every `metrics_every` s).

Nothing here decides. A worker is listed when its pod runs and is Ready, or when it is being deleted (it may still
hold adapters that must be drained); `terminating` marks the latter, and only a pod that is Ready and not
terminating is ever a routing target (`decide.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lorafleet.operator import constants as c
from lorafleet.operator import resources as res
from lorafleet.operator.scrape import WorkerLoad
from lorafleet.operator.workerclient import AdapterInfo, WorkerClient, WorkerError, make_client

log = logging.getLogger(__name__)

ANNOT_DRAIN = "lorafleet.io/drain"
UNREACHABLE_GRACE = 3.0  # seconds a timing-out worker keeps its last known adapters


@dataclass
class Worker:
    pod: str
    uid: str | None
    ip: str | None
    node: str | None
    endpoint: str | None
    draining: bool
    client: WorkerClient | None = None
    adapters: dict[str, AdapterInfo] | None = None  # None: not reachable this cycle
    load: WorkerLoad | None = None
    stale: bool = False  # adapters are the last known ones (the latest probe timed out)
    retiring: bool = False  # picked by the scale-down plan: emptied, then removed by the ReplicaSet
    terminating: bool = False  # deletionTimestamp set: never routed, only drained

    @property
    def reachable(self) -> bool:
        return self.adapters is not None

    def holds(self, adapter: str) -> bool:
        return bool(self.adapters and adapter in self.adapters and self.adapters[adapter].servable)


def pod_is_running(pod: Mapping[str, Any]) -> bool:
    """Running, Ready (or no readiness reported yet), with an IP, and not being deleted."""
    status = pod.get("status") or {}
    if pod.get("metadata", {}).get("deletionTimestamp") or status.get("phase") != "Running":
        return False
    ready = [cond for cond in status.get("conditions") or [] if cond.get("type") == "Ready"]
    return bool(status.get("podIP")) and (not ready or ready[0].get("status") == "True")


class Observer:
    """Worker clients (one per pod endpoint, kept across cycles) and the probes of one cycle."""

    def __init__(self, rt: Any, basemodel: str) -> None:
        self.rt = rt
        self.basemodel = basemodel
        self.token: str | None = None
        self._clients: dict[tuple[str, str], WorkerClient] = {}
        self._loads: dict[str, WorkerLoad] = {}
        self._last_scrape = 0.0
        self._last_seen: dict[str, tuple[float, dict[str, AdapterInfo]]] = {}

    def set_token(self, token: str) -> None:
        self.token = token
        for client in self._clients.values():
            client.token = token

    def _endpoint(self, pod: Mapping[str, Any], port: int) -> str | None:
        if self.rt.config.local_endpoints:
            return (pod["metadata"].get("annotations") or {}).get(c.ANNOT_LOCAL_ENDPOINT)
        ip = (pod.get("status") or {}).get("podIP")
        return f"{ip}:{port}" if ip else None

    def _client(self, engine: str, pod: str, endpoint: str) -> WorkerClient:
        key = (pod, endpoint)
        if key not in self._clients:
            self._clients[key] = make_client(engine, f"http://{endpoint}", self.token, retries=2, backoff=0.1)
        return self._clients[key]

    def workers(self, bm: Mapping[str, Any], pods: list[Mapping[str, Any]], retiring: set[str]) -> list[Worker]:
        port, engine = res.worker_port(bm), res.engine_of(bm)
        out: list[Worker] = []
        for pod in pods:
            meta = pod["metadata"]
            terminating = bool(meta.get("deletionTimestamp"))
            if not terminating and not pod_is_running(pod):
                continue
            endpoint = self._endpoint(pod, port)
            w = Worker(
                pod=meta["name"],
                uid=meta.get("uid"),
                ip=(pod.get("status") or {}).get("podIP"),
                node=(pod.get("spec") or {}).get("nodeName"),
                endpoint=endpoint,
                draining=terminating
                or (meta.get("annotations") or {}).get(ANNOT_DRAIN) == "true"
                or meta["name"] in retiring,
                retiring=meta["name"] in retiring,
                terminating=terminating,
            )
            if endpoint:
                w.client = self._client(engine, w.pod, endpoint)
            out.append(w)
        return out

    async def probe(self, workers: list[Worker], busy: set[str]) -> None:
        """Fills each worker's adapters (and, every `metrics_every` s, its load); closes clients of pods that are
        gone unless a running drain (`busy`) still uses them."""
        scrape = time.monotonic() - self._last_scrape >= self.rt.config.metrics_every
        if scrape:
            self._last_scrape = time.monotonic()
        await asyncio.gather(*(self._probe(w, scrape) for w in workers))
        names = {w.pod for w in workers}
        for pod in [p for p in self._last_seen if p not in names]:
            del self._last_seen[pod]
        live = {(w.pod, w.endpoint) for w in workers}
        for key in [k for k in self._clients if k not in live and k[0] not in busy]:
            await self._clients.pop(key).aclose()

    async def _probe(self, w: Worker, scrape: bool) -> None:
        if w.client is None:
            return
        try:
            w.adapters = {a.name: a for a in await w.client.adapters()}
            self._last_seen[w.pod] = (time.monotonic(), w.adapters)
        except WorkerError as exc:
            log.debug("worker %s unreachable: %s", w.pod, exc)
            self.rt.metrics.worker_errors.labels(self.basemodel, "adapters").inc()
            # A slow answer (timeout) from a worker seen healthy moments ago is not a crash: keep its last known
            # adapters for a short grace so one busy second does not reshuffle routing. A refused connection
            # (process gone) or a 5xx is believed at once.
            seen = self._last_seen.get(w.pod)
            if "Timeout" in exc.message and seen and time.monotonic() - seen[0] < UNREACHABLE_GRACE:
                w.adapters, w.stale = seen[1], True
            return
        if scrape:
            try:
                self._loads[w.pod] = await w.client.load_report()
            except (WorkerError, ValueError):
                self.rt.metrics.worker_errors.labels(self.basemodel, "metrics").inc()
        w.load = self._loads.get(w.pod)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
