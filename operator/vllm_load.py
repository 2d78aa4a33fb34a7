"""Per-adapter load of a stock vLLM worker, from what vLLM exports: decisions as pure functions over scrapes.

vLLM has no per-adapter request counter. It has `vllm:request_success_total` (finished requests of the whole
server) and `vllm:lora_requests_info`, a gauge per (running adapters, waiting adapters) combination whose value is
the time the engine last stepped in that combination. So:

- **rate**: the server's finished-request rate between two scrapes, shared among the adapters by how many of the
  combinations stamped during that interval name them (running or waiting). An adapter busy for the whole interval
  next to one busy for a moment gets the larger share; two adapters always busy together share equally. Smoothed
  like our workers' `lorafleet_adapter_request_rate` (EWMA, 30 s), so `replicas.auto` and the rebalancer read the
  same kind of number from either engine.
- **drained**: a drain believes "nothing in flight for this adapter" only from the newest combination, never from a
  stale one and never from a tie, and only from one stamped after the drain began (the worker's clock on both
  sides, so clock skew between hosts does not matter). A server whose own running and waiting totals are zero is
  idle for every adapter: that is how a drain ends on an engine that has not stepped since the drain began.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lorafleet.operator.scrape import WorkerLoad

TAU_S = 30.0  # the EWMA time constant of our workers' per-adapter rate
MIN_WINDOW_S = 2.0  # shorter intervals hold too few finished requests to share out


def in_flight(adapter: str, load: WorkerLoad | None) -> tuple[int, int]:
    """(running, waiting) of one adapter as 0/1 flags, from the newest unambiguous combination; a tie or no
    sample says (0, 0) unless the server's totals show requests, then whatever the newest stamps name."""
    if load is None:
        return 0, 0
    info = load.newest
    if info is None:
        if load.running + load.waiting == 0:
            return 0, 0
        named_r = any(adapter in i.running for i in load.lora_info if i.ts == load.newest_ts)
        named_w = any(adapter in i.waiting for i in load.lora_info if i.ts == load.newest_ts)
        return int(named_r and load.running > 0), int(named_w and load.waiting > 0)
    return int(adapter in info.running), int(adapter in info.waiting)


def drained(adapter: str, load: WorkerLoad, since: float | None) -> bool:
    """True when the scrape proves `adapter` has nothing running or waiting. `since` is the newest stamp the first
    scrape of the drain saw (None: none existed)."""
    if load.running + load.waiting == 0:
        return True  # nothing in flight on the whole server
    info = load.newest
    # Only a fresh, unambiguous combination speaks for one adapter: the engine stepped after the drain began.
    return info is not None and (since is None or info.ts > since) and not info.names(adapter)


def stamped_since(load: WorkerLoad, prev: dict[tuple[frozenset[str], frozenset[str]], float]) -> list[frozenset[str]]:
    """The adapter sets (running | waiting) of every combination stamped after its stamp in `prev`."""
    out = []
    for info in load.lora_info:
        key = (info.running, info.waiting)
        if info.ts > prev.get(key, -math.inf):
            out.append(info.running | info.waiting)
    return out


def shares(states: list[frozenset[str]]) -> dict[str, float]:
    """Each adapter's share (summing to 1) of the combinations stamped in an interval; {} when none named one."""
    counts: dict[str, int] = {}
    for state in states:
        for a in state:
            counts[a] = counts.get(a, 0) + 1
    total = sum(counts.values())
    return {a: n / total for a, n in sorted(counts.items())} if total else {}


def interval_rates(finished: float, seconds: float, states: list[frozenset[str]]) -> dict[str, float]:
    """Per-adapter request rate over one interval: `finished` requests in `seconds`, shared by `shares`."""
    if seconds <= 0 or finished <= 0:
        return {}
    total = finished / seconds
    return {a: total * s for a, s in shares(states).items()}


@dataclass
class RateTracker:
    """One vLLM worker's per-adapter rates across scrapes (kept by its client; the arithmetic is above)."""

    tau_s: float = TAU_S
    min_window_s: float = MIN_WINDOW_S
    rates: dict[str, float] = field(default_factory=dict)
    _at: float | None = None
    _requests: float = 0.0
    _stamps: dict[tuple[frozenset[str], frozenset[str]], float] = field(default_factory=dict)

    def update(self, load: WorkerLoad, now: float) -> dict[str, float]:
        """Folds one scrape taken at monotonic time `now` into the smoothed rates and returns them."""
        if load.requests_total is None:
            return dict(self.rates)
        if self._at is None:
            self._begin(load, now)
            return {}
        dt = now - self._at
        if dt < self.min_window_s:
            return dict(self.rates)
        finished = load.requests_total - self._requests
        if finished < 0:  # the server restarted: its counter began again
            finished = load.requests_total
        window = interval_rates(finished, dt, stamped_since(load, self._stamps))
        keep = math.exp(-dt / self.tau_s)
        names = set(self.rates) | set(window)
        self.rates = {
            a: r for a in sorted(names) if (r := self.rates.get(a, 0.0) * keep + window.get(a, 0.0) * (1 - keep)) > 1e-3
        }
        self._begin(load, now)
        return dict(self.rates)

    def _begin(self, load: WorkerLoad, now: float) -> None:
        self._at = now
        self._requests = load.requests_total or 0.0
        self._stamps = {(i.running, i.waiting): i.ts for i in load.lora_info}
