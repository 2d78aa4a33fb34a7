"""Parses metrics exactly as the real worker's registry renders them (and vLLM's lora_requests_info shape)."""

from __future__ import annotations

from lorafleet.operator.scrape import parse_metrics
from prometheus_client import CollectorRegistry, Gauge, generate_latest


def test_vllm_style_text() -> None:
    r = CollectorRegistry()
    Gauge("vllm:num_requests_running", "", ["model_name"], registry=r).labels("m").set(3)
    Gauge("vllm:num_requests_waiting", "", ["model_name"], registry=r).labels("m").set(2)
    Gauge("vllm:gpu_cache_usage_perc", "", ["model_name"], registry=r).labels("m").set(0.25)
    info = Gauge(
        "vllm:lora_requests_info", "", ["max_lora", "running_lora_adapters", "waiting_lora_adapters"], registry=r
    )
    info.labels("4", "a,b", "").set(100.0)
    info.labels("4", "c", "d").set(200.0)  # newest sample wins
    rate = Gauge("lorafleet_adapter_request_rate", "", ["adapter"], registry=r)
    rate.labels("a").set(1.5)
    rate.labels("b").set(0.5)
    load = parse_metrics(generate_latest(r).decode())
    assert load.running == 3 and load.waiting == 2 and load.kv_usage == 0.25
    assert load.lora_running == {"c"} and load.lora_waiting == {"d"} and load.max_lora == 4
    assert len(load.lora_info) == 2 and load.newest_ts == 200.0
    assert load.adapter_rate == {"a": 1.5, "b": 0.5} and load.total_rate == 2.0


def test_real_worker_metrics_render() -> None:
    from lorafleet.worker.metrics import WorkerMetrics

    m = WorkerMetrics("base", max_loras=4, max_adapter_labels=8)
    m.on_adapter_load(0.01)
    text = generate_latest(m.registry).decode()
    load = parse_metrics(text)
    assert load.running == 0 and load.loads_total >= 1
