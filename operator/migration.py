"""Safe handoff of one adapter replica from a source worker to a target worker (dLoRA co-migration, cluster level).

Order matters and is the whole point: (1) load on the target, (2) add the target to routing, (3) remove the source
from routing, (4) give routers a grace period to see the new slice, (5) wait until the source reports no running or
waiting requests of the adapter, (6) unload from the source. At every instant each routed pod holds the adapter,
so no request fails or reaches a worker without it; the source's last requests finish on the source's own weights.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from lorafleet.operator.workerclient import WorkerClient, WorkerError

log = logging.getLogger(__name__)

RouteFn = Callable[[], Awaitable[None]]


@dataclass
class HandoffResult:
    adapter: str
    loaded_s: float = 0.0
    routed_s: float = 0.0
    drained_s: float = 0.0
    total_s: float = 0.0
    drain_timed_out: bool = False


async def wait_drained(source: WorkerClient, adapter: str, *, timeout: float, poll: float = 0.05) -> bool:
    """True when the source reports zero in-flight requests for `adapter` (or no longer has it) within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await source.in_flight(adapter) == 0:
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


async def handoff(
    adapter: str,
    path: str,
    source: WorkerClient | None,
    target: WorkerClient,
    *,
    route_add_target: RouteFn,
    route_remove_source: RouteFn,
    grace: float = 1.0,
    drain_timeout: float = 60.0,
) -> HandoffResult:
    t0 = time.monotonic()
    res = HandoffResult(adapter)
    await target.load(adapter, path)
    res.loaded_s = time.monotonic() - t0
    await route_add_target()
    await route_remove_source()
    res.routed_s = time.monotonic() - t0
    res.drained_s, res.drain_timed_out = await drain_and_unload(source, adapter, grace=grace, timeout=drain_timeout)
    res.total_s = time.monotonic() - t0
    return res
