"""`lorafleet up` / `down` as a user runs them: a real background supervisor, control plane, operator and workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_up_serves_every_sample_adapter_and_down_stops_everything(tmp_path: Path) -> None:
    state = tmp_path / "home"
    up = _cli("up", "--state-dir", str(state), "--model", "tiny", "--workers", "1", "--timeout", "300", timeout=500)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "kubectl get lorafleet" in up.stdout and "/v1/completions" in up.stdout
        info = json.loads((state / "up.json").read_text())
        assert info["status"] == "ready" and len(info["adapters"]) == 3
        for name in info["adapters"]:
            r = httpx.post(
                f"http://{info['endpoints'][name]}/v1/completions",
                json={"model": name, "prompt": "hello", "max_tokens": 4},
                timeout=60,
            )
            assert r.status_code == 200 and r.json()["model"] == name
        env = {**os.environ, "KUBECONFIG": info["kubeconfig"]}
        got = subprocess.run([info["kubectl"], "get", "loraadapters", "-n", info["namespace"], "-o", "json"],
                             capture_output=True, text=True, env=env, check=True)  # fmt: skip
        phases = {i["metadata"]["name"]: i["status"]["phase"] for i in json.loads(got.stdout)["items"]}
        assert phases == {name: "Ready" for name in info["adapters"]}
        # the instructions' `kubectl get lorafleet` (the CRDs' category) works at once, with the user's own cache
        listed = subprocess.run([info["kubectl"], "get", "lorafleet", "-A", "-o", "name"],
                                capture_output=True, text=True, env=env)  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        assert sorted(listed.stdout.split()) == sorted(
            [f"basemodel.lorafleet.io/{info['model']}"]
            + [f"loraadapter.lorafleet.io/{a}" for a in info["adapters"]]
            + ["continuallearningjob.lorafleet.io/support-en-online"]
        )
        # the printed feedback command is accepted durably by the worker that serves the job's adapter, once the
        # job has started (until then the worker refuses feedback for an adapter nobody trains: 404)
        deadline = time.monotonic() + 90
        while True:
            fb = httpx.post(
                f"http://{info['endpoints']['support-en']}/v1/feedback",
                json={"adapter": "support-en", "kind": "pair", "prompt": "Hello, fleet", "completion": " Hi!"},
                timeout=60,
            )
            if fb.status_code != 404 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert fb.status_code == 202 and fb.json()["adapter"] == "support-en", fb.text
        again = _cli("up", "--state-dir", str(state), timeout=60)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        down = _cli("down", "--state-dir", str(state), timeout=120)
    assert down.returncode == 0 and "stopped" in down.stdout
    pid = json.loads((state / "up.json").read_text())["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    left = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True).stdout.split()
    assert left == [], left  # no worker, operator or control-plane process of this fleet is left

    # up again over the same state dir (models and adapters cached there): a fresh fleet that serves again
    up = _cli("up", "--state-dir", str(state), "--model", "tiny", "--workers", "1", "--timeout", "300", timeout=500)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        info = json.loads((state / "up.json").read_text())
        name = info["adapters"][0]
        r = httpx.post(f"http://{info['endpoints'][name]}/v1/completions",
                       json={"model": name, "prompt": "hello", "max_tokens": 4}, timeout=60)  # fmt: skip
        assert r.status_code == 200 and r.json()["model"] == name
    finally:
        down = _cli("down", "--state-dir", str(state), timeout=120)
    assert down.returncode == 0 and "stopped" in down.stdout
