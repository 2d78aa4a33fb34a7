"""One entry point for every source scheme: `SourceResolver.fetch(uri, kind)` -> a verified local directory.

Why one object per worker: the cache bound, the metrics and the set of versions in use are shared by the adapter
store (adapters), the start-up path (the base model) and continual learning (publishing versions), so eviction can
never remove a directory something still reads. Remote fetches run outside the engine thread (the load API calls
`fetch` in a worker thread first); the adapter store's resolvers then only look up what was fetched.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafleet.worker.lora.sources.cache import SourceCache
from lorafleet.worker.lora.sources.errors import SourceError
from lorafleet.worker.lora.sources.hf import HFSource
from lorafleet.worker.lora.sources.progress import SourceMetrics
from lorafleet.worker.lora.sources.pvc import DEFAULT_CLAIM_ROOT, PVCSource
from lorafleet.worker.lora.sources.s3 import S3Source, s3_client, upload_dir
from lorafleet.worker.lora.sources.uri import SourceRef, parse
from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    if os.environ.get("LORAFLEET_SOURCE_CACHE"):
        return Path(os.environ["LORAFLEET_SOURCE_CACHE"])
    return Path(os.environ.get("LORAFLEET_CACHE", Path.home() / ".cache" / "lorafleet")) / "sources"


class SourceResolver:
    def __init__(
        self,
        cache_dir: str | Path | None = None,
        max_bytes: int = 20 << 30,
        claim_root: str | Path = DEFAULT_CLAIM_ROOT,
        registry: CollectorRegistry | None = None,
        s3: Any | None = None,
        s3_endpoint_url: str | None = None,
        hf_endpoint: str | None = None,
        hf_token: str | None = None,
    ) -> None:
        self.cache = SourceCache(cache_dir or default_cache_dir(), max_bytes)
        self.metrics = SourceMetrics(registry)
        self._s3_endpoint = s3_endpoint_url
        self.s3 = S3Source(self.cache, self.metrics, s3)
        self.hf = HFSource(self.cache, self.metrics, hf_endpoint, hf_token)
        self.pvc = PVCSource(claim_root)
        self._latest: dict[str, Path] = {}  # uri -> the directory of its newest fetch (never evicted)
        self._lock = threading.Lock()

    def _s3_client(self) -> Any:
        if self.s3._client is None:
            self.s3._client = s3_client(self._s3_endpoint)
        return self.s3._client

    def fetch(self, uri: str, kind: str = "adapter") -> Path:
        """The verified local directory of `uri`; raises SourceError (naming the source) on any failure."""
        ref = parse(uri)
        if ref.scheme == "file":
            raise SourceError(uri, "local paths are resolved by the adapter store's roots, not fetched")
        if ref.scheme == "pvc":
            return self.pvc.fetch(ref, kind)
        if ref.scheme == "s3":
            self._s3_client()
        source = self.s3 if ref.scheme == "s3" else self.hf
        t0 = time.monotonic()
        try:
            path, fresh = source.fetch(ref, kind)
        except SourceError:
            self.metrics.fetches.labels(ref.scheme, "failed").inc()
            raise
        self.metrics.seconds.labels(ref.scheme).observe(time.monotonic() - t0)
        self.metrics.fetches.labels(ref.scheme, "downloaded" if fresh else "cached").inc()
        with self._lock:
            self._latest[uri] = path
            protected = list(self._latest.values())
        self.cache.evict(protected)
        self.metrics.cache_bytes.set(self.cache.size_bytes())
        return path

    def resolved(self, uri: str) -> Path:
        """The adapter store's resolver: what `fetch` last gave for `uri` (no network), else a fetch now."""
        with self._lock:
            hit = self._latest.get(uri)
        if hit is not None and hit.is_dir():
            return hit
        return self.fetch(uri, "adapter")

    def adapter_resolvers(self) -> dict[str, Callable[[str], Path]]:
        return {"s3": self.resolved, "hf": self.resolved, "pvc": lambda uri: self.fetch(uri, "adapter")}

    def publish(self, local: Path, uri: str) -> str:
        """Uploads a version directory to an `s3://` URI (continual learning's store); returns the URI."""
        ref: SourceRef = parse(uri)
        if ref.scheme != "s3":
            raise SourceError(uri, "versions are published to s3:// stores or to a shared directory")
        return upload_dir(self._s3_client(), Path(local), uri, ref)
