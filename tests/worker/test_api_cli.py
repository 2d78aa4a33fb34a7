"""`lorafleet worker` as a user runs it: a subprocess with flags, a token file, a preloaded adapter and JSON logs;
it becomes ready, serves base and adapter, guards admin endpoints, and exits 0 on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import httpx
from lorafleet.worker.api.testing import wait_process_ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lorafleet_worker_cli(tiny_model, adapter_root, adapters, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("cli-token\n")
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "lorafleet.cli",
        "worker",
        "--model",
        str(tiny_model),
        "--served-model-name",
        "tiny",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--adapter-root",
        str(adapter_root),
        "--lora-modules",
        f"ad-r4={adapters['ad-r4']}",
        "--admin-token-file",
        str(token_file),
        "--max-loras",
        "2",
        "--max-lora-rank",
        "16",
        "--num-kv-blocks",
        "128",
        "--max-num-seqs",
        "8",
        "--log-json",
        "--api-key",
        "cli-key",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAFLEET_ADMIN_TOKEN": "ignored-because-file-wins"}
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_process_ready(proc, url, log_path)
        with httpx.Client(base_url=url, timeout=30) as c:
            key, admin = {"Authorization": "Bearer cli-key"}, {"Authorization": "Bearer cli-token"}
            assert c.get("/v1/models").status_code == 401  # --api-key guards the inference routes
            assert c.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
            models = {m["id"]: m for m in c.get("/v1/models", headers=key).json()["data"]}
            assert models["ad-r4"]["parent"] == "tiny" and models["tiny"]["root"] == "tiny"  # no host path
            models = {m["id"]: m for m in c.get("/v1/models", headers=admin).json()["data"]}
            assert models["tiny"]["root"] == str(tiny_model)  # the admin token is accepted and sees paths
            for model in ("tiny", "ad-r4"):
                r = c.post("/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 3}, headers=key)
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
            assert c.post("/v1/completions", json={"model": "tiny", "prompt": "hello"}).status_code == 401
            assert c.get("/v1/adapters").status_code == 401
            assert (
                c.get("/v1/adapters", headers={"Authorization": "Bearer ignored-because-file-wins"}).status_code == 403
            )
            listing = c.get("/v1/adapters", headers={"Authorization": "Bearer cli-token"})
            assert listing.status_code == 200 and listing.json()["max_loras"] == 2
            assert [a["name"] for a in listing.json()["data"]] == ["ad-r4"]
            assert "lorafleet_adapter_requests_total" in c.get("/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(5)
    assert rc == 0, log_path.read_text()[-3000:]
    text = log_path.read_text()
    assert "cli-token" not in text and "cli-key" not in text  # credentials are never logged
    lines = [line for line in text.splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    start = [r for r in records if r["msg"] == "worker starting"]
    assert start and start[0]["port"] == port and start[0]["admin_auth"] is True
    assert any(r["msg"] == "adapter loaded" and r.get("adapter") == "ad-r4" for r in records)
    assert any(r["logger"].startswith("uvicorn") for r in records)  # access/server lines share the JSON format


def test_admin_token_sources(tmp_path, monkeypatch):
    import pytest
    from lorafleet.worker.main import TOKEN_ENV, read_admin_token

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert read_admin_token(None) is None  # no token configured: admin endpoints answer loopback only
    monkeypatch.setenv(TOKEN_ENV, " from-env \n")
    assert read_admin_token(None) == "from-env"
    f = tmp_path / "t"
    f.write_text("from-file\n")
    assert read_admin_token(str(f)) == "from-file"  # the file wins over the environment
    f.write_text("  \n")
    with pytest.raises(SystemExit):
        read_admin_token(str(f))  # an empty token file is a deployment error, not "no auth"


def test_worker_flags_map_to_engine_config(tmp_path):
    import pytest
    from lorafleet.worker.main import build_parser, engine_config, parse_lora_modules

    args = build_parser().parse_args(
        ["--model", str(tmp_path), "--max-loras", "3", "--max-cpu-loras", "9", "--max-lora-rank", "32"]
        + ["--adapter-root", "/a", "--adapter-root", "/b", "--max-num-seqs", "5", "--max-batched-tokens", "256"]
        + ["--kv-cache-bytes", "1048576", "--block-size", "8", "--lora-admission", "fifo"]
        + ["--max-admission-wait-steps", "7", "--async-scheduling"]
    )
    cfg = engine_config(args)
    assert cfg.async_scheduling is True
    off = ["--model", str(tmp_path), "--no-async-scheduling"]
    assert engine_config(build_parser().parse_args(off)).async_scheduling is False
    assert engine_config(build_parser().parse_args(["--model", str(tmp_path)])).async_scheduling is None  # auto
    assert (cfg.lora_admission, cfg.max_admission_wait_steps) == ("fifo", 7)
    assert (cfg.max_loras, cfg.max_cpu_loras, cfg.max_lora_rank) == (3, 9, 32)
    assert cfg.adapter_roots == ["/a", "/b"]
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.kv_cache_bytes, cfg.block_size) == (5, 256, 1 << 20, 8)
    assert parse_lora_modules(["a=/x", " b = /y "]) == [("a", "/x"), ("b", "/y")]
    with pytest.raises(SystemExit):
        parse_lora_modules(["no-equals-sign"])
    with pytest.raises(SystemExit):
        engine_config(build_parser().parse_args(["--model", "m", "--max-loras", "8", "--max-cpu-loras", "2"]))


def test_api_with_async_scheduling_serves_the_same_tokens(tiny_model, adapter_root, adapters):
    """The HTTP layer over an engine with async scheduling (outputs one step later, a final settle-only step):
    completions, streams and usage equal the synchronous engine's, through base and adapter."""
    from lorafleet.worker.api.testing import start_worker

    got = {}
    for mode in (False, True):
        w = start_worker(
            str(tiny_model), served_model_name="tiny", adapter_roots=[str(adapter_root)], async_scheduling=mode
        )
        try:
            with httpx.Client(base_url=w.url, timeout=60) as c:
                name = next(iter(adapters))
                r = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapters[name])})
                assert r.status_code == 200, r.text
                out = []
                for model in ("tiny", name):
                    body = {
                        "model": model,
                        "prompt": [5, 6, 7, 8],
                        "max_tokens": 9,
                        "temperature": 0,
                        "ignore_eos": True,
                    }
                    j = c.post("/v1/completions", json=body).json()
                    out.append((j["choices"][0]["text"], j["choices"][0]["finish_reason"], j["usage"]))
                    chunks = []
                    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
                        for line in s.iter_lines():
                            if line.startswith("data: ") and line != "data: [DONE]":
                                chunks.append(json.loads(line[6:])["choices"][0]["text"])
                    out.append("".join(chunks))
                got[mode] = out
        finally:
            w.close()
    assert got[True] == got[False]
    assert got[False][0][2]["completion_tokens"] == 9


def test_worker_freezes_its_start_up_heap(tiny_model):
    """The engine built for `lorafleet worker` (model, tokenizer, store) is out of the cyclic collector's reach: a
    generation-2 pass over it inside a serving step is a stall every running request pays (276 ms on an H200)."""
    import gc

    from lorafleet.worker.main import build_parser, build_worker

    gc.unfreeze()
    probe = [[]]  # a tracked container alive before start-up: frozen with the rest
    app, runner = build_worker(build_parser().parse_args(["--model", str(tiny_model), "--kv-cache-bytes", "8388608"]))
    try:
        assert runner.wait_ready(120), runner.error
        frozen = gc.get_freeze_count()
        assert frozen > 1000, frozen  # the model's modules and parameters, the tokenizer, the store...
        assert not any(o is probe for o in gc.get_objects(generation=2))  # frozen objects are in no generation
        gc.collect()
        # later passes leave the frozen heap alone: the probe stays out of every generation, and the count only
        # falls by frozen objects that die by reference count (a serving thread may drop a few meanwhile)
        assert not any(o is probe for o in gc.get_objects(generation=2))
        assert 1000 < gc.get_freeze_count() <= frozen
    finally:
        runner.stop()
        gc.unfreeze()


def test_http_layer_flags_map_to_api_settings_and_bad_values_are_usage_errors(tmp_path, monkeypatch, capsys):
    """The offload pool, the /tokenize cap and the body limit are deployment knobs: each flag reaches ApiSettings,
    and a value the pool cannot run with is argparse's usage error (exit 2, the flag named), not a traceback later."""
    import pytest
    from lorafleet.worker.main import API_KEY_ENV, FEEDBACK_KEY_ENV, TOKEN_ENV, api_settings, build_parser

    for env in (TOKEN_ENV, API_KEY_ENV, FEEDBACK_KEY_ENV):
        monkeypatch.delenv(env, raising=False)
    argv = ["--model", str(tmp_path), "--offload-threads", "3", "--offload-backlog", "0"]
    argv += ["--max-tokenize-tokens", "1000", "--max-request-body-bytes", "65536"]
    s = api_settings(build_parser().parse_args(argv), "tiny")
    assert (s.offload_threads, s.offload_backlog, s.max_tokenize_tokens, s.max_body_bytes) == (3, 0, 1000, 65536)
    assert s.served_model_name == "tiny" and s.admin_token is None
    for flag, value in [("--offload-threads", "0"), ("--offload-backlog", "-1"), ("--max-tokenize-tokens", "x")]:
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["--model", str(tmp_path), flag, value])
        assert exc.value.code == 2
        assert flag in capsys.readouterr().err
