"""Per-request decode latency, as the engine saw it, for whoever steers by it.

Why: co-serving fine-tuning must keep a percentile of per-request TPOT under a target (training/slo.py), and only
the engine knows each request's first-token and finish times without the HTTP layer in between (the benchmarks
drive `LLMEngine` directly). A bounded ring with a running count lets several readers each keep a cursor and read
every sample once, without the engine knowing who reads.
"""

from __future__ import annotations

from collections import deque
from itertools import islice


class RequestTpotLog:
    def __init__(self, size: int = 4096) -> None:
        self._ring: deque[tuple[float, float]] = deque(maxlen=size)
        self.count = 0  # samples ever added

    def add(self, first_token_time: float, finish_time: float, output_tokens: int) -> None:
        """A finished request; one with a single output token has no TPOT and is not logged."""
        if output_tokens < 2:
            return
        tpot = (finish_time - first_token_time) / (output_tokens - 1)
        self._ring.append((0.5 * (first_token_time + finish_time), tpot))
        self.count += 1

    def since(self, cursor: int) -> tuple[list[tuple[float, float]], int]:
        """(decode midpoint, TPOT) of the samples after `cursor`, and the new cursor (older ones may have fallen
        out of the ring: a reader that lags by more than its size skips them)."""
        new = min(self.count - cursor, len(self._ring))
        if new <= 0:
            return [], self.count
        return list(islice(self._ring, len(self._ring) - new, None)), self.count
