"""Parses a worker's Prometheus `/metrics` text into the few numbers placement and the handoff need.

Uses prometheus-client's own parser (the exposition format has enough corner cases that a regex would lie).
Works for our engine (`lorafleet_adapter_request_rate{adapter}`) and for stock vLLM (`vllm:*` only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class WorkerLoad:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    adapter_rate: dict[str, float] = field(default_factory=dict)
    lora_running: set[str] = field(default_factory=set)
    lora_waiting: set[str] = field(default_factory=set)
    max_lora: int | None = None
    loads_total: float = 0.0

    @property
    def total_rate(self) -> float:
        return sum(self.adapter_rate.values())


def _split(names: str) -> set[str]:
    return {n for n in (s.strip() for s in names.split(",")) if n}


def parse_metrics(text: str) -> WorkerLoad:
    out = WorkerLoad()
    newest_info: tuple[float, dict[str, str]] | None = None
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
                # vLLM exposes one gauge sample per state change whose value is a timestamp: the newest is current.
                if newest_info is None or value >= newest_info[0]:
                    newest_info = (value, dict(labels))
            elif name == "lorafleet_adapter_load_seconds_count" and labels.get("tier", "host") == "host":
                out.loads_total += value  # one observation per adapter loaded through the load API
    if newest_info is not None:
        labels = newest_info[1]
        out.lora_running = _split(labels.get("running_lora_adapters", ""))
        out.lora_waiting = _split(labels.get("waiting_lora_adapters", ""))
        if labels.get("max_lora", "").isdigit():
            out.max_lora = int(labels["max_lora"])
    return out


def vllm_in_flight(adapter: str, load: WorkerLoad | None) -> tuple[int, int]:
    """(running, waiting) of one adapter on a stock vLLM worker, as 0/1 flags.

    `vllm:lora_requests_info` names which adapters have requests, but a stale or tied sample can still name one after
    its requests finished: the worker's own running/waiting totals are the check (zero in flight overall is zero for
    every adapter), so a drain never waits on a sample nobody refreshed.
    """
    if load is None:
        return 0, 0
    running = 1 if adapter in load.lora_running and load.running > 0 else 0
    waiting = 1 if adapter in load.lora_waiting and load.waiting > 0 else 0
    return running, waiting
