"""A real Prometheus server (Debian's package, installed by hack/prometheus.sh) scrapes the worker every second,
and a per-adapter series is read back through Prometheus' HTTP API with the value the traffic implies."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from lorafleet.worker.api.testing import start_worker

ROOT = Path(__file__).resolve().parents[2]
SERVED = "tiny"
ADAPTER = "ad-r8"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    out = subprocess.run(["bash", str(ROOT / "hack/prometheus.sh")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    path = out.stdout.strip().splitlines()[-1]
    assert Path(path).is_file(), path
    return path


@pytest.fixture()
def worker(tiny_model, adapter_root, adapters):
    w = start_worker(str(tiny_model), served_model_name=SERVED, adapter_roots=[str(adapter_root)], num_kv_blocks=256)
    yield w
    w.close()


@pytest.fixture()
def prometheus(prometheus_bin, worker, tmp_path):
    port = free_port()
    target = worker.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n"
        "scrape_configs:\n"
        f"  - job_name: lorafleet-worker\n    metrics_path: /metrics\n    static_configs:\n      - targets: ['{target}']\n"
    )
    log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            prometheus_bin,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def query(url: str, promql: str) -> list[dict]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def poll(url: str, promql: str, want, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    result: list[dict] = []
    while time.monotonic() < deadline:
        result = query(url, promql)
        if result and want(result):
            return result
        time.sleep(0.5)
    raise AssertionError(f"{promql}: last result {result}")


def test_prometheus_reads_per_adapter_series(worker, prometheus, adapters):
    with httpx.Client(base_url=worker.url, timeout=60) as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": ADAPTER, "lora_path": str(adapters[ADAPTER])})
        assert r.status_code == 200
        tokens = 0
        for i in range(3):
            r = c.post(
                "/v1/completions", json={"model": ADAPTER, "prompt": f"hello {i}", "max_tokens": 4, "ignore_eos": True}
            )
            assert r.status_code == 200
            tokens += r.json()["usage"]["completion_tokens"]
        assert c.post("/v1/completions", json={"model": SERVED, "prompt": "base", "max_tokens": 2}).status_code == 200

    res = poll(
        prometheus, f'lorafleet_adapter_requests_total{{adapter="{ADAPTER}"}}', lambda r: r[0]["value"][1] == "3"
    )
    assert len(res) == 1
    assert res[0]["metric"]["job"] == "lorafleet-worker"
    assert res[0]["metric"]["instance"] == worker.url.removeprefix("http://")

    res = poll(
        prometheus,
        f'lorafleet_adapter_tokens_total{{adapter="{ADAPTER}",kind="generation"}}',
        lambda r: r[0]["value"][1] == str(tokens),
    )
    res = poll(
        prometheus, f'lorafleet_adapter_request_rate{{adapter="{ADAPTER}"}}', lambda r: float(r[0]["value"][1]) > 0
    )
    res = poll(prometheus, "vllm:num_requests_running", lambda r: r[0]["value"][1] == "0")
    assert res[0]["metric"]["model_name"] == SERVED
    res = poll(prometheus, 'lorafleet_adapter_loads_total{tier="host"}', lambda r: r[0]["value"][1] == "1")
    up = query(prometheus, 'up{job="lorafleet-worker"}')
    assert up and up[0]["value"][1] == "1"
