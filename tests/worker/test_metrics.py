"""`/metrics` after known traffic has exactly the counts that traffic implies (real engine, real server), label
cardinality stays bounded, and the EWMA request rate and the NVML collector behave as documented."""

from __future__ import annotations

import math
import threading
import time

import httpx
import pytest
from lorafleet.worker.api.testing import start_worker, wait_for
from prometheus_client.parser import text_string_to_metric_families

SERVED = "tiny"


def scrape(client) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} of one /metrics page."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def series(samples, name: str) -> dict[tuple, float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def value(samples, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def worker(tiny_model, adapter_root):
    w = start_worker(
        str(tiny_model),
        served_model_name=SERVED,
        adapter_roots=[str(adapter_root)],
        max_loras=2,
        max_adapter_labels=1,
        num_kv_blocks=512,
    )
    yield w
    w.close()


@pytest.fixture(scope="module")
def traffic(worker, adapters):
    """ad-r4: 3 x 4 tokens (own label); ad-r8: 2 x 2 tokens (over the label cap: "other"); base: 2 x 3 tokens."""
    prompts: dict[str, int] = {"ad-r4": 0, "other": 0, SERVED: 0}
    with httpx.Client(base_url=worker.url, timeout=60) as c:
        for name in ("ad-r4", "ad-r8"):
            r = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapters[name])})
            assert r.status_code == 200
        plan = [("ad-r4", 4)] * 3 + [("ad-r8", 2)] * 2 + [(SERVED, 3)] * 2
        for i, (model, n) in enumerate(plan):
            body = {"model": model, "prompt": f"count {i} " * (i + 1), "max_tokens": n, "ignore_eos": True}
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == n
            prompts["other" if model == "ad-r8" else model] += r.json()["usage"]["prompt_tokens"]
    assert wait_for(lambda: worker.runner.snapshot.num_running == 0)
    return prompts


def test_metrics_after_known_traffic(worker, traffic):
    with httpx.Client(base_url=worker.url, timeout=30) as c:
        m = scrape(c)
    req = series(m, "lorafleet_adapter_requests_total")
    assert req == {(("adapter", "ad-r4"),): 3.0, (("adapter", "other"),): 2.0, (("adapter", SERVED),): 2.0}
    for adapter, gen in (("ad-r4", 12), ("other", 4), (SERVED, 6)):
        assert value(m, "lorafleet_adapter_tokens_total", adapter=adapter, kind="generation") == gen
        assert value(m, "lorafleet_adapter_tokens_total", adapter=adapter, kind="prompt") == traffic[adapter]
    assert value(m, "lorafleet_adapter_request_latency_seconds_count", adapter="ad-r4") == 3
    assert value(m, "lorafleet_adapter_request_latency_seconds_count", adapter="other") == 2
    assert value(m, "lorafleet_adapter_request_latency_seconds_sum", adapter="ad-r4") > 0
    assert not any(dict(labels).get("adapter") == "ad-r8" for (_, labels) in m)  # capped: only "other"

    assert value(m, "vllm:generation_tokens_total", model_name=SERVED) == 22
    assert value(m, "vllm:prompt_tokens_total", model_name=SERVED) == sum(traffic.values())
    assert value(m, "vllm:time_to_first_token_seconds_count", model_name=SERVED) == 7
    # one inter-token interval per token after the first: 3*3 + 2*1 + 2*2
    assert value(m, "vllm:time_per_output_token_seconds_count", model_name=SERVED) == 15
    assert value(m, "vllm:time_per_output_token_seconds_sum", model_name=SERVED) > 0
    assert value(m, "vllm:num_requests_running", model_name=SERVED) == 0
    assert value(m, "vllm:num_requests_waiting", model_name=SERVED) == 0
    assert value(m, "vllm:gpu_cache_usage_perc", model_name=SERVED) == 0
    assert value(m, "lorafleet_kv_blocks") == 512

    info = series(m, "vllm:lora_requests_info")
    assert len(info) == 1
    (labels, stamp), *_ = info.items()
    assert dict(labels) == {"max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert abs(stamp - time.time()) < 60

    assert value(m, "lorafleet_adapters", tier="gpu") == 2
    assert value(m, "lorafleet_adapters", tier="host") == 0
    assert value(m, "lorafleet_adapters", tier="disk") == 0
    assert value(m, "lorafleet_adapter_loads_total", tier="host") == 2
    assert value(m, "lorafleet_adapter_loads_total", tier="gpu") == 2
    assert value(m, "lorafleet_adapter_load_seconds_count", tier="host") == 2
    assert value(m, "lorafleet_adapter_load_seconds_count", tier="gpu") >= 1
    rate = value(m, "lorafleet_adapter_request_rate", adapter="ad-r4")
    assert 0.03 < rate <= 0.1  # 3 arrivals / tau (30 s), decayed by the seconds since
    assert not [n for (n, _) in m if n.startswith("lorafleet_gpu_")]  # no NVML here: absent, not zero


def test_lora_requests_info_shows_running_adapter(worker, traffic):
    body = {"model": "ad-r4", "prompt": "long", "max_tokens": 600, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=worker.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)

            def running_label():
                info = series(scrape(c), "vllm:lora_requests_info")
                return [dict(labels)["running_lora_adapters"] for labels in info]

            assert wait_for(lambda: running_label() == ["ad-r4"], timeout=30), running_label()
            m = scrape(c)
            assert value(m, "vllm:num_requests_running", model_name=SERVED) == 1
            assert value(m, "vllm:gpu_cache_usage_perc", model_name=SERVED) > 0


def test_unloaded_adapter_series_are_removed(worker, traffic):
    with httpx.Client(base_url=worker.url, timeout=30) as c:
        # the stream the previous test left is aborted asynchronously; its end would record ad-r4 series again
        running = lambda: value(scrape(c), "vllm:num_requests_running", model_name=SERVED)  # noqa: E731
        assert wait_for(lambda: running() == 0, timeout=30), running()
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "ad-r4"}).status_code == 200
        m = scrape(c)
    assert not [(n, labels) for (n, labels) in m if dict(labels).get("adapter") == "ad-r4"]
    assert value(m, "lorafleet_adapter_requests_total", adapter="other") == 2  # history of others stays


def test_request_rate_is_an_ewma_in_requests_per_second():
    from lorafleet.worker.metrics import RequestRate

    r = RequestRate(tau_s=10.0)
    t = 0.0
    for _ in range(600):  # 2 req/s for 300 s
        r.observe("a", now=t)
        t += 0.5
    assert r.rate("a", now=t) == pytest.approx(2.0, rel=0.06)
    assert r.rate("a", now=t + 10) == pytest.approx(r.rate("a", now=t) * math.exp(-1), rel=1e-9)
    assert r.rate("a", now=t + 200) < 1e-6  # traffic stopped: the rate falls to zero
    assert r.rate("never", now=t) == 0.0


def test_adapter_labels_are_capped_and_freed():
    from lorafleet.worker.metrics import OTHER, AdapterLabels

    labels = AdapterLabels(max_labels=2)
    labels.set_loaded(["a", "b", "c"])
    assert labels.label(None, "base") == "base"
    assert [labels.label(n, "base") for n in ("a", "b", "c", "zz")] == ["a", "b", OTHER, OTHER]
    assert labels.set_loaded(["b", "c"]) == ["a"]  # a unloaded: its series must go, its label slot is free
    assert labels.label("c", "base") == "c"
    assert labels.labelled() == ["b", "c"]


def test_gpu_collector_absent_without_nvml_and_shaped_with_samples():
    from lorafleet.worker.gpu import GpuCollector, GpuSample, Nvml

    nvml = Nvml()
    assert nvml.available is False  # this machine has no NVIDIA driver: pynvml raises NVMLError
    assert list(GpuCollector(nvml).collect()) == []

    class OneGpu(Nvml):  # NVML cannot run here; this only checks how samples become families
        def sample(self):
            return [GpuSample(0, "H100", "GPU-1", 87.0, 40 << 30, 80 << 30, 512.5)]

    fams = {f.name: f for f in GpuCollector(OneGpu()).collect()}
    assert fams["lorafleet_gpu_utilization_percent"].samples[0].value == 87.0
    assert fams["lorafleet_gpu_memory_used_bytes"].samples[0].value == 40 << 30
    assert fams["lorafleet_gpu_power_watts"].samples[0].labels == {"gpu": "0", "uuid": "GPU-1", "name": "H100"}


def test_metrics_scrape_is_thread_safe_under_traffic(worker, traffic):
    """Scraping while requests run never errors (the engine thread updates, the event loop reads)."""
    errors: list[Exception] = []

    def hammer():
        with httpx.Client(base_url=worker.url, timeout=30) as c:
            for _ in range(20):
                try:
                    scrape(c)
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)

    t = threading.Thread(target=hammer)
    t.start()
    with httpx.Client(base_url=worker.url, timeout=30) as c:
        for i in range(4):
            assert (
                c.post("/v1/completions", json={"model": SERVED, "prompt": f"p{i}", "max_tokens": 3}).status_code == 200
            )
    t.join(30)
    assert errors == []
