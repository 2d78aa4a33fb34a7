"""Overload (429 + Retry-After), a model still loading (503 from /ready and the serving routes while /health is
200) and an engine that died (503 everywhere, /health 503, an open stream ends with an error event instead of
hanging). Real LLMEngine on the tiny Llama, real uvicorn server."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from lorafleet.worker.api.testing import assert_openai_error, start_worker, wait_for

SERVED = "tiny"
LONG = {"model": SERVED, "prompt": "a very long story", "max_tokens": 900, "ignore_eos": True, "stream": True}


def _stats(worker):
    return worker.call(lambda e: e.stats())


def test_overload_gets_429_with_retry_after(tiny_model):
    w = start_worker(str(tiny_model), served_model_name=SERVED, max_waiting=1, max_num_seqs=1, num_kv_blocks=512)
    try:
        with httpx.Client(base_url=w.url, timeout=30) as c:
            with c.stream("POST", "/v1/completions", json=LONG) as running:
                lines = running.iter_lines()  # keep a reference: a collected iterator closes the connection
                next(lines)
                with c.stream("POST", "/v1/completions", json=LONG) as waiting:
                    assert waiting.status_code == 200
                    assert wait_for(lambda: _stats(w).num_waiting == 1)
                    r = c.post("/v1/completions", json={"model": SERVED, "prompt": "one more", "max_tokens": 2})
                    err = assert_openai_error(r, 429, "RateLimitError")
                    assert "waiting" in err["message"]
                    assert r.headers["retry-after"] == "1"
                    chat = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
                    assert_openai_error(c.post("/v1/chat/completions", json=chat), 429)
            assert wait_for(lambda: _stats(w).num_running + _stats(w).num_waiting == 0, timeout=30)
            r = c.post("/v1/completions", json={"model": SERVED, "prompt": "one more", "max_tokens": 2})
            assert r.status_code == 200
    finally:
        w.close()


def test_not_ready_while_loading(tiny_model):
    from lorafleet.worker.config import EngineConfig
    from lorafleet.worker.engine.llm_engine import LLMEngine

    gate = threading.Event()

    def slow_factory():
        gate.wait(60)
        return LLMEngine(EngineConfig(model=str(tiny_model), num_kv_blocks=64))

    w = start_worker(str(tiny_model), served_model_name=SERVED, engine_factory=slow_factory, wait_ready=False)
    try:
        with httpx.Client(base_url=w.url, timeout=30) as c:
            assert c.get("/health").status_code == 200
            r = c.get("/ready")
            assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"]
            r = c.post("/v1/completions", json={"model": SERVED, "prompt": "x", "max_tokens": 1})
            err = assert_openai_error(r, 503, "ServiceUnavailableError")
            assert "loading" in err["message"] and r.headers["retry-after"]
            gate.set()
            assert wait_for(lambda: c.get("/ready").status_code == 200, timeout=60)
            r = c.post("/v1/completions", json={"model": SERVED, "prompt": "x", "max_tokens": 1})
            assert r.status_code == 200
    finally:
        gate.set()
        w.close()


def test_engine_failure_is_503_not_a_hang(tiny_model):
    w = start_worker(str(tiny_model), served_model_name=SERVED, num_kv_blocks=512)
    try:
        with httpx.Client(base_url=w.url, timeout=30) as c:
            with c.stream("POST", "/v1/completions", json=LONG) as r:
                lines = r.iter_lines()
                next(lines)

                def boom():
                    raise RuntimeError("injected step failure")

                w.call(lambda e: setattr(e, "step", boom))  # the next iteration raises inside the engine thread
                rest = [line for line in lines if line.startswith("data: ")]
            assert rest[-1] == "data: [DONE]"
            error = json.loads(rest[-2][len("data: ") :])
            assert error["error"]["code"] == 503 and "injected step failure" in error["error"]["message"]

            assert wait_for(lambda: c.get("/health").status_code == 503)
            assert "injected step failure" in c.get("/health").json()["reason"]
            assert c.get("/ready").status_code == 503
            r = c.post("/v1/completions", json={"model": SERVED, "prompt": "x", "max_tokens": 1})
            err = assert_openai_error(r, 503, "ServiceUnavailableError")
            assert "injected step failure" in err["message"]
            chat = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}]}
            assert_openai_error(c.post("/v1/chat/completions", json=chat), 503)
            assert_openai_error(c.post("/v1/unload_lora_adapter", json={"lora_name": "x"}), 503)
            assert c.get("/metrics").status_code == 200
    finally:
        w.close()


@pytest.mark.parametrize("stream", [False, True])
def test_requests_in_flight_when_engine_dies_get_503(tiny_model, stream):
    """A non-streaming request waiting for its result gets a 503 body when the engine dies under it."""
    w = start_worker(str(tiny_model), served_model_name=SERVED, num_kv_blocks=512)
    try:
        result: dict = {}

        def send():
            with httpx.Client(base_url=w.url, timeout=30) as c:
                result["r"] = c.post("/v1/completions", json={**LONG, "stream": stream})

        t = threading.Thread(target=send)
        t.start()
        assert wait_for(lambda: _stats(w).num_running == 1, timeout=30)

        def boom():
            raise RuntimeError("injected")

        w.call(lambda e: setattr(e, "step", boom))
        t.join(10)
        assert not t.is_alive()
        r = result["r"]
        if stream:
            assert r.status_code == 200 and '"code":503' in r.text and r.text.endswith("data: [DONE]\n\n")
        else:
            assert_openai_error(r, 503)
    finally:
        w.close()
