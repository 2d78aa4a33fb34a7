"""`replicas.auto` with hysteresis: scale up at once, scale down only after the rate stayed low for a while.

Why: the measured rate is an exponentially weighted estimate that wobbles around any steady value. Sizing replicas
as ceil(rate / per-replica) on every cycle makes a stream near a boundary add and remove a replica every few seconds,
and each removal is a drain (un-route, wait for in-flight requests, unload) plus a reload when it comes back. So
a smaller count is only taken when (1) even a `margin`-discounted per-replica rate would need no more replicas than
it, and (2) that has held continuously for `delay` seconds. Scale-up stays immediate: it protects latency.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lorafleet.operator import assign


@dataclass
class _Held:
    replicas: int
    low_since: float | None = None


@dataclass
class AutoScaler:
    """Per-adapter replica decisions of one fleet; fixed-replica adapters pass through `assign.desired_replicas`."""

    per_replica_rate: float = 4.0
    delay: float = 30.0
    margin: float = 0.8
    _held: dict[str, _Held] = field(default_factory=dict)

    def decide(self, name: str, spec: Mapping[str, Any], rate: float, workers: int, now: float) -> tuple[int, int]:
        """(replicas to run, replicas asked for), like `assign.desired_replicas`, with scale-down hysteresis."""
        want, asked = assign.desired_replicas(spec, rate, workers, per_replica_rate=self.per_replica_rate)
        rep = spec.get("replicas")
        if not isinstance(rep, Mapping) or not rep.get("auto"):
            self._held.pop(name, None)
            return want, asked
        held = self._held.get(name)
        if held is None or asked >= held.replicas:
            self._held[name] = _Held(asked)
            return want, asked
        # fewer replicas suggested: only the count that a discounted per-replica rate still allows
        lo = max(int(rep.get("min") or 1), 1)
        band = max(lo, math.ceil(rate / (self.per_replica_rate * self.margin)) if rate > 0 else lo)
        if band >= held.replicas:
            held.low_since = None
        elif held.low_since is None:
            held.low_since = now
        elif now - held.low_since >= self.delay:
            self._held[name] = _Held(band)
        return min(self._held[name].replicas, workers), self._held[name].replicas

    def held(self, name: str) -> int | None:
        """The auto replica count currently held for `name` (None: fixed replicas or not decided yet)."""
        held = self._held.get(name)
        return None if held is None else held.replicas

    def forget(self, name: str) -> None:
        self._held.pop(name, None)
