"""Download progress in logs and metrics: one object per fetch, fed with byte counts as they arrive.

Why a separate piece: both remote sources report the same way, so a stuck or slow download looks the same in the
worker's log (a line every `log_every` bytes and at the end) and on its /metrics page whatever the source.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger("lorafleet.worker.sources")


class SourceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        kw = {"registry": self.registry}
        self.bytes = Counter(
            "lorafleet_source_download_bytes", "Bytes downloaded from remote sources", ["scheme"], **kw
        )
        self.fetches = Counter(
            "lorafleet_source_fetches",
            "Source fetches by result (cached, downloaded, failed)",
            ["scheme", "result"],
            **kw,
        )
        self.seconds = Histogram(
            "lorafleet_source_fetch_seconds",
            "Time to resolve a remote source into a verified local directory",
            ["scheme"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
            **kw,
        )
        self.pending = Gauge("lorafleet_source_download_pending_bytes", "Bytes left in downloads in flight", **kw)
        self.publishes = Counter(
            "lorafleet_source_publishes",
            "Continual-learning versions written to their adapter's store, by result (published, failed attempt)",
            ["scheme", "result"],
            **kw,
        )
        self.cache_bytes = Gauge("lorafleet_source_cache_bytes", "Bytes held in the local source cache", **kw)


class Progress:
    """Counts the bytes of one download; logs every `log_every` bytes and at `done`."""

    def __init__(self, uri: str, scheme: str, total: int, metrics: SourceMetrics, log_every: int = 64 << 20) -> None:
        self.uri, self.scheme, self.total, self.metrics = uri, scheme, total, metrics
        self.done_bytes = 0
        self.log_every = log_every
        self._next_log = log_every
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        metrics.pending.inc(total)
        log.info("downloading %s (%d bytes)", uri, total)

    def skip(self, n: int) -> None:
        """Bytes already on disk from an earlier attempt (a resumed download)."""
        with self._lock:
            self.done_bytes += n
            self.metrics.pending.dec(n)
        if n:
            log.info("resuming %s: %d of %d bytes already downloaded", self.uri, self.done_bytes, self.total)

    def add(self, n: int) -> None:
        with self._lock:
            self.done_bytes += n
            self.metrics.bytes.labels(self.scheme).inc(n)
            self.metrics.pending.dec(n)
            due = self.done_bytes >= self._next_log
            if due:
                self._next_log += self.log_every
        if due:
            log.info("downloading %s: %d of %d bytes", self.uri, self.done_bytes, self.total)

    def close(self, ok: bool) -> None:
        self.metrics.pending.dec(max(0, self.total - self.done_bytes))
        secs = time.monotonic() - self._t0
        if ok:
            log.info("downloaded %s: %d bytes in %.2f s", self.uri, self.done_bytes, secs)
        else:
            log.warning("download of %s failed after %d of %d bytes", self.uri, self.done_bytes, self.total)
