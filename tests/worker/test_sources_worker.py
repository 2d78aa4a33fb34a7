"""A `lorafleet worker` process with its base model from hf:// and adapters from s3:// and pvc://, as a pod runs it.

The model comes from a local hub (HF_ENDPOINT, HF_TOKEN), adapters from versitygw through boto3's standard
credential chain (environment) and from a claim directory; completions through them equal those through the same
adapter loaded from a plain path, a bad source answers 400 naming it while the current version keeps serving, and
the fetches show on /metrics.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import httpx
from lorafleet.worker.api.testing import wait_for
from lorafleet.worker.lora.sources.hubserver import HubServer
from lorafleet.worker.lora.sources.s3server import S3Server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_worker_serves_hf_model_and_s3_pvc_adapters(tiny_model, adapter_root, adapters, tmp_path):
    claims = tmp_path / "claims"
    shutil.copytree(adapters["ad-r8"], claims / "shared" / "tenants" / "b")
    with S3Server(tmp_path / "s3") as s3, HubServer(token="hf_tok") as hub:
        client = s3.client()
        client.create_bucket(Bucket="adapters")
        for p in adapters["ad-r4"].iterdir():
            client.put_object(Bucket="adapters", Key=f"a/{p.name}", Body=p.read_bytes())
        hub.add_repo("org/tiny", tiny_model)
        port = free_port()
        cmd = [
            sys.executable, "-m", "lorafleet.cli", "worker", "--model", "hf://org/tiny", "--served-model-name", "tiny",
            "--host", "127.0.0.1", "--port", str(port), "--adapter-root", str(adapter_root),
            "--source-cache", str(tmp_path / "cache"), "--claim-root", str(claims),
            "--max-loras", "2", "--max-lora-rank", "16", "--num-kv-blocks", "128", "--max-num-seqs", "8",
        ]  # fmt: skip
        env = {
            **os.environ,
            **s3.env(),
            "OMP_NUM_THREADS": "1",
            "HF_ENDPOINT": hub.endpoint,
            "HF_TOKEN": "hf_tok",
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
        }
        log_path = tmp_path / "worker.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:

            def ready() -> bool:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                try:
                    return httpx.get(f"{url}/ready", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            assert wait_for(ready, timeout=120, interval=0.2), log_path.read_text()[-3000:]
            with httpx.Client(base_url=url, timeout=60) as c:

                def load(name: str, path: str) -> httpx.Response:
                    return c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})

                def text(model: str) -> str:
                    body = {"model": model, "prompt": "hello world", "max_tokens": 6, "temperature": 0}
                    r = c.post("/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    return r.json()["choices"][0]["text"]

                for name, src in (("s3a", "s3://adapters/a"), ("pvcb", "pvc://shared/tenants/b")):
                    assert load(name, src).status_code == 200
                assert load("plain-a", str(adapters["ad-r4"])).status_code == 200
                assert load("plain-b", str(adapters["ad-r8"])).status_code == 200
                assert text("s3a") == text("plain-a") and text("pvcb") == text("plain-b")
                assert text("s3a") != text("pvcb")
                listed = {a["name"]: a for a in c.get("/v1/adapters").json()["data"]}
                assert listed["s3a"]["path"] == "s3://adapters/a"
                before = text("s3a")
                for bad, why in (
                    ("s3://adapters/none", "no objects under this prefix"),
                    ("hf://org/absent", "repository not found"),
                    ("pvc://shared/../x", "outside claim"),
                ):
                    r = c.post(
                        "/v1/load_lora_adapter", json={"lora_name": "s3a", "lora_path": bad, "load_inplace": True}
                    )
                    assert r.status_code == 400 and bad in r.text and why in r.text, r.text
                    assert text("s3a") == before
                page = c.get("/metrics").text
                assert 'lorafleet_source_fetches_total{result="downloaded",scheme="hf"} 1.0' in page
                assert 'lorafleet_source_fetches_total{result="downloaded",scheme="s3"} 1.0' in page
                assert 'lorafleet_source_fetches_total{result="failed",scheme="s3"} 1.0' in page
        finally:
            proc.terminate()
            proc.wait(timeout=30)
