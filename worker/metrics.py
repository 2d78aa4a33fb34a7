"""The worker's Prometheus metrics: vLLM-compatible names where they exist, `lorafleet_*` per-adapter series otherwise.

Why a private `CollectorRegistry` per worker: tests start several apps in one process, and the continual-learning
code registers its own metrics on the same registry (`WorkerMetrics.registry`), so everything one worker knows is
exposed on its one `/metrics` page.

Label cardinality is bounded (`AdapterLabels`): only adapters that are loaded get their own `adapter` label, at most
`max_adapter_labels` of them; everything else is counted under `"other"`. Series of an unloaded adapter are removed
so that adapter churn does not grow the page forever (Prometheus treats a reappearing counter as a reset).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OTHER = "other"

# Bucket edges as in vLLM's serving metrics, so dashboards made for vLLM read ours unchanged.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TPOT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TIERS = ("disk", "host", "gpu")  # AdapterStore tiers: registered only (weights on disk) / host memory / GPU slot


class RequestRate:
    """Exponentially weighted request rate (req/s) per adapter, decayed continuously in time.

    Each arrival adds `1/tau` to a value that decays by `exp(-dt/tau)`; for a steady Poisson stream of rate λ the
    expectation converges to λ. The operator's placement reads it (`/v1/adapters`, `lorafleet_adapter_request_rate`),
    so it must fall back to zero when traffic stops, which a sliding counter read at arrivals would not do.
    """

    def __init__(self, tau_s: float = 30.0) -> None:
        self.tau_s = tau_s
        self._values: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def observe(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            value, t = self._values.get(key, (0.0, now))
            self._values[key] = (value * math.exp(-(now - t) / self.tau_s) + 1.0 / self.tau_s, now)

    def rate(self, key: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            value, t = self._values.get(key, (0.0, now))
        return value * math.exp(-max(0.0, now - t) / self.tau_s)

    def forget(self, key: str) -> None:
        with self._lock:
            self._values.pop(key, None)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._values)


class AdapterLabels:
    """Maps adapter names to bounded `adapter` label values: loaded adapters up to a cap, the rest `"other"`."""

    def __init__(self, max_labels: int = 64) -> None:
        self.max_labels = max_labels
        self._loaded: set[str] = set()
        self._labelled: set[str] = set()
        self._lock = threading.Lock()

    def set_loaded(self, names: Iterable[str]) -> list[str]:
        """Replaces the loaded set; returns label values that are no longer valid (their series must go)."""
        with self._lock:
            self._loaded = set(names)
            gone = sorted(self._labelled - self._loaded)
            self._labelled -= set(gone)
            return gone

    def label(self, name: str | None, base_label: str) -> str:
        if name is None:
            return base_label
        with self._lock:
            if name in self._labelled:
                return name
            if name in self._loaded and len(self._labelled) < self.max_labels:
                self._labelled.add(name)
                return name
        return OTHER

    def labelled(self) -> list[str]:
        with self._lock:
            return sorted(self._labelled)


class WorkerMetrics:
    """All serving metrics of one worker; updated by the engine runner thread, read by `/metrics`."""

    def __init__(self, served_model_name: str, max_loras: int = 0, max_adapter_labels: int = 128) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.base_label = served_model_name
        self.max_loras = max_loras
        self.labels = AdapterLabels(max_adapter_labels)
        self.rates = RequestRate()
        r = self.registry
        model = ["model_name"]
        self.num_running = Gauge("vllm:num_requests_running", "Requests in the running batch.", model, registry=r)
        self.num_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", model, registry=r)
        self.lora_info = Gauge(
            "vllm:lora_requests_info",
            "Running and waiting LoRA adapters; the value is the time of the last update.",
            ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            registry=r,
        )
        self.cache_usage = Gauge("vllm:gpu_cache_usage_perc", "KV-cache usage, 1 = 100%.", model, registry=r)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", model, buckets=TTFT_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Time between output tokens.",
            model,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefilled prompt tokens.", model, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", model, registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Preemptions by the scheduler.", model, registry=r)
        self.adapter_requests = Counter(
            "lorafleet_adapter_requests",
            "Requests admitted, per adapter (base model: served name).",
            ["adapter"],
            registry=r,
        )
        self.adapter_tokens = Counter(
            "lorafleet_adapter_tokens",
            "Tokens per adapter; kind = prompt | generation.",
            ["adapter", "kind"],
            registry=r,
        )
        self.adapter_latency = Histogram(
            "lorafleet_adapter_request_latency_seconds",
            "End-to-end latency of finished requests, per adapter.",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_rate = Gauge(
            "lorafleet_adapter_request_rate", "EWMA request rate (req/s) per adapter.", ["adapter"], registry=r
        )
        self.tier_count = Gauge(
            "lorafleet_adapters", "Adapters per store tier (gpu / host / disk).", ["tier"], registry=r
        )
        self.adapter_loads = Counter(
            "lorafleet_adapter_loads",
            "Adapter loads; tier = host (registered: read + validated into host memory) | gpu (uploaded to a slot).",
            ["tier"],
            registry=r,
        )
        self.adapter_evictions = Counter(
            "lorafleet_adapter_evictions", "Adapter evictions; tier = host | gpu.", ["tier"], registry=r
        )
        self.adapter_load_seconds = Histogram(
            "lorafleet_adapter_load_seconds",
            "Adapter load time; tier = host (admin load: read, validate) | gpu (slot upload, last one per step).",
            ["tier"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.kv_blocks_used = Gauge("lorafleet_kv_blocks_used", "Paged KV-cache blocks in use.", registry=r)
        self.kv_blocks_total = Gauge(
            "lorafleet_kv_blocks", "Paged KV-cache blocks in total (a gauge: the pool size).", registry=r
        )
        self._lora_info_key: tuple[str, str, str] | None = None
        self._store_counters: dict[str, int] = {}
        self._preemptions_seen = 0
        self._rate_labels: set[str] = set()
        for tier in TIERS:
            self.tier_count.labels(tier).set(0)

    # -- per request, called from the engine thread -----------------------------------------------------------
    def adapter_label(self, lora_name: str | None) -> str:
        return self.labels.label(lora_name, self.base_label)

    def on_admitted(self, lora_name: str | None) -> None:
        self.adapter_requests.labels(self.adapter_label(lora_name)).inc()
        self.rates.observe(lora_name or self.base_label)

    def on_first_token(self, lora_name: str | None, ttft_s: float, num_prompt_tokens: int) -> None:
        self.ttft.labels(self.base_label).observe(ttft_s)
        self.prompt_tokens.labels(self.base_label).inc(num_prompt_tokens)
        self.adapter_tokens.labels(self.adapter_label(lora_name), "prompt").inc(num_prompt_tokens)

    def on_tokens(self, lora_name: str | None, n: int, interval_s: float | None) -> None:
        if n <= 0:
            return
        self.generation_tokens.labels(self.base_label).inc(n)
        self.adapter_tokens.labels(self.adapter_label(lora_name), "generation").inc(n)
        if interval_s is not None:
            per_token = interval_s / n
            for _ in range(n):
                self.tpot.labels(self.base_label).observe(per_token)

    def on_finished(self, lora_name: str | None, latency_s: float) -> None:
        self.adapter_latency.labels(self.adapter_label(lora_name)).observe(latency_s)

    def on_adapter_load(self, seconds: float) -> None:
        self.adapter_load_seconds.labels("host").observe(seconds)

    # -- engine state, refreshed by the engine thread after iterations ------------------------------------------
    def update_engine(
        self,
        *,
        num_running: int,
        num_waiting: int,
        kv_usage: float,
        kv_blocks_used: int,
        kv_blocks_total: int,
        num_preemptions: int,
        running_adapters: Iterable[str],
        waiting_adapters: Iterable[str],
    ) -> None:
        self.num_running.labels(self.base_label).set(num_running)
        self.num_waiting.labels(self.base_label).set(num_waiting)
        self.cache_usage.labels(self.base_label).set(kv_usage)
        self.kv_blocks_used.set(kv_blocks_used)
        self.kv_blocks_total.set(kv_blocks_total)
        if num_preemptions > self._preemptions_seen:
            self.preemptions.labels(self.base_label).inc(num_preemptions - self._preemptions_seen)
            self._preemptions_seen = num_preemptions
        key = (str(self.max_loras), ",".join(sorted(running_adapters)), ",".join(sorted(waiting_adapters)))
        if key != self._lora_info_key:
            # One series only (vLLM keeps every combination it ever saw, which grows without bound).
            self.lora_info.clear()
            self._lora_info_key = key
        self.lora_info.labels(*key).set(time.time())

    # (store counter, metric, tier label): the AdapterStore's cumulative counters mirrored as Prometheus counters
    _STORE_COUNTERS = (
        ("loads", "adapter_loads", "host"),
        ("slot_loads", "adapter_loads", "gpu"),
        ("host_evictions", "adapter_evictions", "host"),
        ("slot_evictions", "adapter_evictions", "gpu"),
    )

    def update_store(
        self,
        tier_counts: dict[str, int],
        counters: dict[str, int],
        last_slot_load_seconds: float | None,
        loaded: Iterable[str],
    ) -> None:
        """Store state: tier counts, its cumulative counters, the last slot-upload time, the loaded adapters."""
        for tier in set(TIERS) | set(tier_counts):
            self.tier_count.labels(tier).set(tier_counts.get(tier, 0))
        for key, attr, tier in self._STORE_COUNTERS:
            new = int(counters.get(key, 0))
            old = self._store_counters.get(key, 0)
            if new > old:
                getattr(self, attr).labels(tier).inc(new - old)
                if key == "slot_loads" and last_slot_load_seconds is not None:
                    self.adapter_load_seconds.labels("gpu").observe(last_slot_load_seconds)
            self._store_counters[key] = max(old, new)
        loaded = list(loaded)
        for gone in self.labels.set_loaded(loaded):
            self._remove_adapter_series(gone)
            self.rates.forget(gone)
        self.refresh_rates()

    def refresh_rates(self) -> None:
        now = time.monotonic()
        current = set(self.labels.labelled())
        for name in current:
            self.adapter_rate.labels(name).set(self.rates.rate(name, now))
        self.adapter_rate.labels(self.base_label).set(self.rates.rate(self.base_label, now))
        for stale in self._rate_labels - current:
            try:
                self.adapter_rate.remove(stale)
            except KeyError:
                pass
        self._rate_labels = current

    def _remove_adapter_series(self, name: str) -> None:
        for metric, labelsets in (
            (self.adapter_requests, [(name,)]),
            (self.adapter_latency, [(name,)]),
            (self.adapter_rate, [(name,)]),
            (self.adapter_tokens, [(name, "prompt"), (name, "generation")]),
        ):
            for labels in labelsets:
                try:
                    metric.remove(*labels)
                except KeyError:
                    pass
