"""Parses a worker's Prometheus `/metrics` text into the few numbers placement, autoscaling and the handoff need.

Uses prometheus-client's own parser (the exposition format has enough corner cases that a regex would lie).
Works for our engine (`lorafleet_adapter_request_rate{adapter}`) and for stock vLLM (`vllm:*` only; its per-adapter
numbers are derived in `vllm_load.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class LoraInfo:
    """One `vllm:lora_requests_info` series: which adapters had requests running / waiting at `ts`.

    vLLM sets the series of the current (running, waiting) combination to the current time on every engine step and
    never removes a combination it saw, so every older series is a stale picture; `ts` is the worker's clock.
    """

    ts: float
    running: frozenset[str]
    waiting: frozenset[str]

    def names(self, adapter: str) -> bool:
        return adapter in self.running or adapter in self.waiting


@dataclass
class WorkerLoad:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    adapter_rate: dict[str, float] = field(default_factory=dict)
    lora_info: tuple[LoraInfo, ...] = ()  # every vllm:lora_requests_info series, in exposition order
    max_lora: int | None = None
    loads_total: float = 0.0
    requests_total: float | None = None  # vllm:request_success_total over every finished_reason (None: absent)

    @property
    def total_rate(self) -> float:
        return sum(self.adapter_rate.values())

    @property
    def newest(self) -> LoraInfo | None:
        """The one current `lora_requests_info` series; None when there is none or the newest time is tied (two
        combinations stamped with the same time: which one is current cannot be told, so neither is believed)."""
        if not self.lora_info:
            return None
        top = max(i.ts for i in self.lora_info)
        tied = {(i.running, i.waiting) for i in self.lora_info if i.ts == top}
        if len(tied) > 1:
            return None
        return next(i for i in self.lora_info if i.ts == top)

    @property
    def newest_ts(self) -> float | None:
        """The newest stamp of any series (tied or not): the worker-clock mark a drain compares later samples to."""
        return max((i.ts for i in self.lora_info), default=None)

    @property
    def lora_running(self) -> frozenset[str]:
        info = self.newest
        return info.running if info else frozenset()

    @property
    def lora_waiting(self) -> frozenset[str]:
        info = self.newest
        return info.waiting if info else frozenset()


def _split(names: str) -> frozenset[str]:
    return frozenset(n for n in (s.strip() for s in names.split(",")) if n)


def parse_metrics(text: str) -> WorkerLoad:
    out = WorkerLoad()
    infos: list[LoraInfo] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "vllm:num_requests_running":
                out.running += value
            elif name == "vllm:num_requests_waiting":
                out.waiting += value
            elif name in ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"):
                out.kv_usage = max(out.kv_usage, value)
            elif name == "lorafleet_adapter_request_rate" and "adapter" in labels:
                out.adapter_rate[labels["adapter"]] = out.adapter_rate.get(labels["adapter"], 0.0) + value
            elif name == "vllm:lora_requests_info":
                infos.append(
                    LoraInfo(
                        value,
                        _split(labels.get("running_lora_adapters", "")),
                        _split(labels.get("waiting_lora_adapters", "")),
                    )
                )
                if labels.get("max_lora", "").isdigit():
                    out.max_lora = int(labels["max_lora"])
            elif name == "vllm:request_success_total":
                out.requests_total = (out.requests_total or 0.0) + value
            elif name == "lorafleet_adapter_load_seconds_count" and labels.get("tier", "host") == "host":
                out.loads_total += value  # one observation per adapter loaded through the load API
    out.lora_info = tuple(infos)
    return out
