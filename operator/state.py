"""Process-wide operator state: configuration, one `BaseModelFleet` per BaseModel, and the kopf index keys.

Nothing here is the source of truth. After a restart the kopf indices are re-filled from the API server (CRs and
pods), and each fleet re-reads what every worker actually holds from its `/v1/adapters`; a replica that is already
loaded is simply observed, never loaded again.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorafleet.operator.events import EventRecorder
    from lorafleet.operator.fleet import BaseModelFleet
    from lorafleet.operator.kube import Kube
    from lorafleet.operator.metrics import OperatorMetrics


def _env_bool(name: str) -> bool:
    return os.environ.get(name, "").lower() in {"1", "true", "yes", "on"}


@dataclass
class OperatorConfig:
    """Knobs of the control loops; defaults are for production, tests shorten the clocks."""

    local_endpoints: bool = field(default_factory=lambda: _env_bool("LORAFLEET_LOCAL_ENDPOINTS"))
    interval: float = 1.0  # seconds between reconcile cycles when nothing wakes the loop
    metrics_every: float = 5.0  # seconds between /metrics scrapes of each worker
    drain_grace: float = 1.0  # seconds routers get to observe a routing change before the source is drained
    drain_timeout: float = 60.0
    rebalance_interval: float = 30.0
    per_replica_rate: float = 4.0  # requests/s one replica should carry for `replicas.auto`
    scale_down_delay: float = 30.0  # seconds an auto adapter's rate must stay low before a replica is removed
    adapter_root: str = "/var/lib/lorafleet/adapters"
    resync_interval: float = 30.0  # seconds between full re-applies of every owned child (watches cover the rest)
    check_local_sources: bool | None = None  # default: on in local mode

    @property
    def check_sources(self) -> bool:
        return self.local_endpoints if self.check_local_sources is None else self.check_local_sources


@dataclass
class Runtime:
    """Shared by all handlers through kopf's `memo`."""

    config: OperatorConfig
    kube: Kube
    metrics: OperatorMetrics
    events: EventRecorder | None = None
    kubeconfig: str | None = None  # `--kubeconfig`; None: $KUBECONFIG, ~/.kube/config or in-cluster (kube.load_config)
    fleets: dict[tuple[str, str], BaseModelFleet] = field(default_factory=dict)

    def event(self, involved: Any, type_: str, reason: str, message: str) -> None:
        """An aggregated Event (events.py); silently skipped where no recorder runs (unit tests)."""
        if self.events is not None:
            self.events.emit(dict(involved), type_, reason, message)

    def fleets_in(self, namespace: str) -> list[BaseModelFleet]:
        return [f for (ns, _), f in self.fleets.items() if ns == namespace]

    def fleet(self, namespace: str, name: str) -> BaseModelFleet | None:
        return self.fleets.get((namespace, name))

    def wake(self, namespace: str | None, basemodel: str | None) -> None:
        if namespace is None or basemodel is None:
            return
        fleet = self.fleets.get((namespace, basemodel))
        if fleet is not None:
            fleet.wake()


def index_key(namespace: str | None, basemodel: Any) -> tuple[str, str]:
    return (str(namespace or ""), str(basemodel or ""))


def snapshot(body: Any) -> dict[str, Any]:
    """A plain-dict copy of a kopf body, safe to keep after the handler returns."""
    import copy

    return copy.deepcopy(dict(body))


async def sleep_or_wake(event: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        pass
