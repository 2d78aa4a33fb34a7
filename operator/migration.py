"""Safe handoff of adapter replicas between workers (dLoRA co-migration, cluster level): the one implementation.

Order is the whole point: (1) load on the target, (2) add the target to routing, (3) remove the source from
routing, (4) give routers a grace period to see the new routing, (5) wait until the source reports nothing of the
adapter running or waiting, (6) unload from the source. At every instant each routed pod holds the adapter, so no
request fails or reaches a worker without it; the source's last requests finish on the source's own weights.

The fleet runs every handoff of a cycle through `Migrator.handoff`: repairs, scale changes, rebalancer moves and
drained workers alike. All loads run concurrently, then the caller's routing step writes (2) and (3) together (one
EndpointSlice write per adapter: atomic, so there is no instant with neither or with a pod that lacks it), then
(4)-(6) run in the background per released replica so one slow request never stalls the fleet. A failed load backs
off per (adapter, pod) and its message becomes the adapter's `LoadFailed` condition.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lorafleet.operator import conditions
from lorafleet.operator.workerclient import WorkerClient, WorkerError

log = logging.getLogger(__name__)

EventFn = Callable[[Mapping[str, Any], str, str, str], None]
Pair = tuple[str, str]  # (adapter, pod)


@dataclass(frozen=True)
class Load:
    """Step (1) for one replica."""

    adapter: str
    pod: str
    client: WorkerClient
    path: str
    body: Mapping[str, Any]  # the LoRAAdapter (its Events)
    node: str | None = None


@dataclass(frozen=True)
class Release:
    """Steps (4)-(6) for one replica the routing step has just removed. `reason`: drain, rebalance (handoffs to
    another worker), scale-down, deleted or invalid (removals)."""

    adapter: str
    pod: str
    client: WorkerClient | None  # None: the source is unreachable, nothing to drain
    reason: str
    body: Mapping[str, Any]


RouteFn = Callable[[set[Pair]], Awaitable[list[Release]]]


async def wait_drained(source: WorkerClient, adapter: str, *, timeout: float, poll: float = 0.05) -> bool:
    """True when the source reports nothing of `adapter` in flight (or no longer has it) within `timeout`. The
    first answer marks the drain's start in the source's own terms (`drain_mark`), so an answer from before the
    drain is never taken as proof."""
    deadline = time.monotonic() + timeout
    mark: float | None = None
    marked = False
    while True:
        try:
            if not marked:
                mark, marked = await source.drain_mark(), True
            if await source.drained(adapter, mark):
                return True
        except WorkerError as exc:
            if exc.status == 0:  # source gone: nothing left to drain
                return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll)


async def drain_and_unload(
    source: WorkerClient | None, adapter: str, *, grace: float, timeout: float
) -> tuple[float, bool]:
    """Steps (4)-(6) for a replica already removed from routing. Returns (seconds, timed_out)."""
    t0 = time.monotonic()
    if source is None:
        return 0.0, False
    await asyncio.sleep(grace)
    ok = await wait_drained(source, adapter, timeout=timeout)
    try:
        await source.unload(adapter)
    except WorkerError as exc:
        if exc.status != 0:
            raise
    return time.monotonic() - t0, not ok


class Migrator:
    """Every handoff of one BaseModel's fleet, and what it must remember between cycles: running drains, load
    back-off, the last load error per adapter, and since when each replica serves."""

    def __init__(
        self,
        basemodel: str,
        metrics: Any,
        event: EventFn,
        wake: Callable[[], None],
        *,
        grace: float,
        timeout: float,
    ) -> None:
        self.basemodel = basemodel
        self.metrics = metrics
        self.event = event
        self.wake = wake
        self.grace = grace
        self.timeout = timeout
        self.drains: dict[Pair, asyncio.Task[None]] = {}
        self.load_errors: dict[str, str] = {}
        self.since: dict[Pair, str] = {}
        self._blocked: dict[Pair, float] = {}  # monotonic time when a failed load may be retried
        self._fails: dict[Pair, int] = {}

    # ------------------------------------------------------------ what the planner must know
    def draining(self) -> set[Pair]:
        return set(self.drains)

    def busy_pods(self) -> dict[str, int]:
        """Replicas still being drained, per pod (a pod that drains something is not empty yet)."""
        out: dict[str, int] = {}
        for _, pod in self.drains:
            out[pod] = out.get(pod, 0) + 1
        return out

    def blocked(self, now: float) -> dict[str, set[str]]:
        """Pods each adapter must not be loaded on right now (back-off after a failed load)."""
        out: dict[str, set[str]] = {}
        for (a, p), until in list(self._blocked.items()):
            if until > now:
                out.setdefault(a, set()).add(p)
            else:
                del self._blocked[(a, p)]
        return out

    # ------------------------------------------------------------ the handoff
    async def handoff(
        self, loads: Iterable[Load], route: RouteFn, *, alongside: Iterable[Awaitable[Any]] = ()
    ) -> set[Pair]:
        """(1) every load, concurrently (with `alongside`, e.g. in-place reloads), then (2)+(3) `route(loaded)`,
        which writes the routing for what is loaded now and returns the replicas it removed, then (4)-(6) for each
        of those in the background. Returns the pairs that loaded."""
        steps = list(loads)
        results = await asyncio.gather(*(self._load(s) for s in steps), *alongside)
        loaded = {(s.adapter, s.pod) for s, ok in zip(steps, results[: len(steps)], strict=True) if ok}
        for rel in await route(loaded):
            self.release(rel)
        return loaded

    async def _load(self, step: Load) -> bool:
        pair = (step.adapter, step.pod)
        try:
            await step.client.load(step.adapter, step.path)
        except WorkerError as exc:
            self.metrics.worker_errors.labels(self.basemodel, "load").inc()
            n = self._fails.get(pair, 0) + 1
            self._fails[pair] = n
            self._blocked[pair] = time.monotonic() + min(0.5 * 2**n, 30.0)
            if exc.status:
                msg = f"worker {step.pod} refused the adapter (HTTP {exc.status}): {exc.message}"
                self.load_errors[step.adapter] = msg
                self.event(step.body, "Warning", "LoadFailed", msg)
            return False
        self.metrics.loads.labels(self.basemodel).inc()
        self._fails.pop(pair, None)
        self.load_errors.pop(step.adapter, None)
        self.since[pair] = conditions.now_iso()
        self.event(step.body, "Normal", "Loaded", f"loaded on worker {step.pod} (node {step.node})")
        return True

    def release(self, rel: Release) -> None:
        """Starts (4)-(6) for a replica unless it is already draining."""
        pair = (rel.adapter, rel.pod)
        if pair not in self.drains:
            self.drains[pair] = asyncio.create_task(self._drain(rel))

    async def _drain(self, rel: Release) -> None:
        try:
            seconds, timed_out = await drain_and_unload(rel.client, rel.adapter, grace=self.grace, timeout=self.timeout)
            if rel.client is not None:
                self.metrics.unloads.labels(self.basemodel).inc()
            if rel.reason in ("drain", "rebalance"):  # a handoff to another worker, not a removal
                self.metrics.migrations.labels(self.basemodel, rel.reason).inc()
            self.since.pop((rel.adapter, rel.pod), None)
            msg = f"unloaded from worker {rel.pod} after {seconds:.2f}s drain ({rel.reason})"
            if timed_out:
                msg += "; drain timed out, in-flight requests finish on the old replica"
            self.event(rel.body, "Normal", "Unloaded", msg)
        except WorkerError as exc:
            self.metrics.worker_errors.labels(self.basemodel, "unload").inc()
            log.warning("unload of %s from %s failed: %s", rel.adapter, rel.pod, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("drain of %s failed", rel.adapter)
        finally:
            self.drains.pop((rel.adapter, rel.pod), None)
            self.wake()

    async def settled(self) -> None:
        """Waits for every running drain (tests, shutdown)."""
        while self.drains:
            await asyncio.gather(*list(self.drains.values()), return_exceptions=True)

    def forget(self, adapter: str) -> None:
        self.load_errors.pop(adapter, None)

    def close(self) -> None:
        for task in self.drains.values():
            task.cancel()
