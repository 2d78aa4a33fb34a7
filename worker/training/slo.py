"""The outer latency loop of co-serving: it steers by the TPOT that requests actually got.

Why: the co-serving controller (coserve.py) acts every iteration on the *iteration time*, aiming its recent mean at
`aim x target`. But the target is about a percentile of per-request TPOT (each request's average over its own
decode iterations), and the two differ in ways an iteration-level loop cannot see:
- lumpy training (a large piece adds milliseconds to a single step) spreads the per-request averages, so with the
  mean on the aim the p99 can still miss the target;
- spiky iterations (a prefill chunk every few steps under heavy load) push a short-window mean over the aim and
  halve the training budget, while the per-request p99 stays well under the target (the `serving` placement at
  90% load: p99 0.95x, slack left unused).
So the guard watches finished requests' TPOTs and moves `aim` until the chosen percentile sits just under the
target: it tightens by a full step as soon as the percentile is over the target's margin (a miss grows by itself
near saturation: slower steps queue more requests into larger, slower batches), loosens in proportional steps, stays
within bounds, and each decision counts only requests that spent at least half of their decode after the previous
change (their TPOT reflects it). With no request finishing, the aim stays put.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass


@dataclass
class GuardConfig:
    quantile: float = 0.99  # the percentile of per-request TPOT the target is about
    # aim that percentile at margin x target, and leave it alone within [margin - band, margin] x target. Per-request
    # TPOTs average ~1 s of iterations, so they move together: an overshoot of a few percent is a miss for nearly
    # every request finishing then (clumps at 1.03-1.06x on an H200 with a 0.97 margin and 8% steps)
    margin: float = 0.95
    band: float = 0.05
    min_samples: int = 16  # fresh finished requests per decision
    aim_min: float = 0.5
    aim_max: float = 1.5
    max_step: float = 0.05  # at most this relative change of the aim per decision
    start: float = 0.9  # the aim a new job starts from (x target): conservative, loosened once requests say so


def quantile(xs: list[float], q: float) -> float:
    """Nearest-rank quantile (a small sample's p99 is its largest value: conservative on purpose)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


class TpotGuard:
    """Moves the iteration-time aim of a co-serving controller by the per-request TPOT percentile."""

    def __init__(self, cfg: GuardConfig | None = None) -> None:
        self.cfg = cfg or GuardConfig()
        self.aim = self.cfg.start
        self.cursor: int | None = None  # the engine's finished-request count read up to (None: start from now)
        self.changed_at = -math.inf
        self.decisions = 0
        self.last_quantile: float | None = None  # the percentile / target of the last decision
        self.history: deque[tuple[float, float, float]] = deque(maxlen=256)  # (time, percentile / target, aim)
        self._fresh: list[float] = []

    def observe(self, samples: list[tuple[float, float]], target_s: float, now: float) -> None:
        """samples: (decode midpoint, TPOT) of requests finished since the last call; now: the same clock."""
        c = self.cfg
        self._fresh.extend(tpot for mid, tpot in samples if mid >= self.changed_at)
        if len(self._fresh) < c.min_samples:
            return
        ratio = quantile(self._fresh, c.quantile) / target_s
        self._fresh.clear()
        self.decisions += 1
        self.last_quantile = ratio
        if ratio > c.margin:
            step = 1.0 - c.max_step
        elif ratio < c.margin - c.band:
            # the aim moves by the square root of the slack (the percentile moves less than the mean it is steered
            # through), at most max_step per decision
            step = min(1.0 + c.max_step, math.sqrt(c.margin / max(ratio, 1e-9)))
        else:
            step = 1.0
        aim = min(c.aim_max, max(c.aim_min, self.aim * step))
        if aim != self.aim:
            self.aim = aim
            self.changed_at = now
        self.history.append((now, ratio, self.aim))

    def feed(self, engine, target_s: float) -> None:
        """Reads the engine's finished-request log from this guard's cursor (each guard reads every sample)."""
        log = engine.request_tpots
        if self.cursor is None:  # requests that finished before the job started say nothing about it
            self.cursor = log.count
            return
        samples, self.cursor = log.since(self.cursor)
        if samples:
            self.observe(samples, target_s, time.monotonic())

    def state(self) -> dict:
        return {"aim": self.aim}

    def restore(self, st: dict) -> None:
        if "aim" in st:
            self.aim = min(self.cfg.aim_max, max(self.cfg.aim_min, float(st["aim"])))
