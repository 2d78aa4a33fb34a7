"""The worker's HTTP API over a real uvicorn server and the real LLMEngine on the tiny Llama (CPU).

What is proven here: greedy outputs are the same streamed and not (and, through an adapter, equal transformers+peft
token for token); the vLLM dynamic-LoRA admin endpoints load/unload adapters that then serve (or 404); bearer auth;
every malformed input gets its status code in OpenAI's error shape; a client that disconnects frees its KV blocks
at once; unloading an adapter mid-stream lets the stream finish on the weights it started with.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from lorafleet.worker.api.testing import assert_openai_error as assert_error
from lorafleet.worker.api.testing import wait_for
from lorafleet.worker.engine.plugin import IterationPlugin

TOKEN = "s3cret-token"
SERVED = "tiny"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def worker(tiny_model, adapter_root, adapters):
    from lorafleet.worker.api.testing import start_worker

    w = start_worker(
        str(tiny_model),
        served_model_name=SERVED,
        admin_token=TOKEN,
        adapter_roots=[str(adapter_root)],
        max_loras=2,
        max_cpu_loras=4,
        max_lora_rank=8,
        block_size=4,
        num_kv_blocks=512,
    )
    finished: dict[str, object] = {}

    class FinishLog(IterationPlugin):
        def on_finish(self, request) -> None:
            finished[request.request_id] = request

    w.runner.add_plugin(FinishLog())
    w.finished = finished
    yield w
    w.close()


@pytest.fixture(scope="module")
def client(worker):
    with httpx.Client(base_url=worker.url, timeout=60) as c:
        yield c


def load(client, name, path, headers=AUTH):
    return client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, headers=headers)


def sse_events(text: str) -> list:
    events = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_health_and_ready(client):
    assert client.get("/health").status_code == 200
    r = client.get("/ready")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    assert client.get("/version").json()["version"] == "0.1.0"


@pytest.mark.parametrize("model", [SERVED, "ad-r8"])
def test_completion_stream_equals_nonstream(client, worker, adapters, model):
    if model != SERVED:
        assert load(client, model, adapters[model]).status_code in (200, 400)  # 400: loaded by an earlier test
    body = {"model": model, "prompt": "the fleet serves", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    r = client.post("/v1/completions", json=body, headers={"X-Request-Id": f"plain-{model}"})
    assert r.status_code == 200, r.text
    full = r.json()
    assert full["id"] == f"plain-{model}" and r.headers["x-request-id"] == f"plain-{model}"
    assert full["object"] == "text_completion" and full["model"] == model
    choice = full["choices"][0]
    assert choice["finish_reason"] == "length"
    prompt_ids = worker.runner.engine.tokenizer("the fleet serves")["input_ids"]
    assert full["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": 12,
        "total_tokens": len(prompt_ids) + 12,
    }
    assert len(worker.finished[f"plain-{model}"].output_token_ids) == 12

    rs = client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert rs.status_code == 200 and rs.headers["content-type"].startswith("text/event-stream")
    events = sse_events(rs.text)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full["usage"]
    chunks = events[:-2]
    assert all(c["id"] == rs.headers["x-request-id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    # the same tokens, not only the same text
    stream_rec = worker.finished[rs.headers["x-request-id"]]
    assert stream_rec.output_token_ids == worker.finished[f"plain-{model}"].output_token_ids


def test_adapter_output_equals_hf_peft(client, worker, adapters, hf_greedy):
    """Through the API, an adapter's greedy tokens equal transformers+peft on the same weights."""
    assert load(client, "ad-r4", adapters["ad-r4"]).status_code == 200
    tok = worker.runner.engine.tokenizer
    prompt_ids = tok("capital city of france is")["input_ids"]
    outs = {}
    for model in (SERVED, "ad-r4"):
        r = client.post(
            "/v1/completions",
            json={"model": model, "prompt": prompt_ids, "max_tokens": 10, "temperature": 0, "ignore_eos": True},
        )
        assert r.status_code == 200, r.text
        outs[model] = worker.finished[r.json()["id"]].output_token_ids
    assert outs["ad-r4"] == hf_greedy(prompt_ids, 10, "ad-r4")
    assert outs[SERVED] == hf_greedy(prompt_ids, 10, None)
    assert outs["ad-r4"] != outs[SERVED]
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "ad-r4"}, headers=AUTH).status_code == 200


def test_chat_stream_equals_nonstream(client, worker):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    body = {"model": SERVED, "messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    full = r.json()
    assert full["object"] == "chat.completion" and full["id"].startswith("chatcmpl-")
    msg = full["choices"][0]["message"]
    assert msg["role"] == "assistant"
    tok = worker.runner.engine.tokenizer
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert full["usage"]["prompt_tokens"] == len(tok(text, add_special_tokens=False)["input_ids"])
    assert worker.finished[full["id"]].prompt_token_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert full["usage"]["completion_tokens"] == 8

    rs = client.post("/v1/chat/completions", json={**body, "stream": True})
    events = sse_events(rs.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == msg["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_string_is_never_streamed(client, worker):
    """Text cut at a stop string is equal streamed and not: a partial stop match is held back, never sent."""
    body = {"model": SERVED, "prompt": "one two three", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    free = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert len(free) > 6
    stop = free[3:6]  # a string the greedy output certainly produces
    r = client.post("/v1/completions", json={**body, "stop": [stop]}).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["text"] == free[: free.index(stop)]
    events = sse_events(client.post("/v1/completions", json={**body, "stop": [stop], "stream": True}).text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == r["choices"][0]["text"]


BAD = [
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": SERVED}, 400, "prompt"),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "n": 129}, 400, "n"),
    ("/v1/completions", {"model": SERVED, "prompt": ["a"] * 65, "n": 2}, 400, "prompt"),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "min_tokens": 9, "max_tokens": 4}, 400, None),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "min_tokens": -1}, 400, "min_tokens"),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "top_k": -5}, 400, None),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": SERVED, "prompt": ["a", [1, 2]]}, 400, "prompt"),
    ("/v1/completions", {"model": SERVED, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": SERVED, "prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "presence_penalty": -3}, 400, "presence_penalty"),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "repetition_penalty": "lots"}, 400, "repetition_penalty"),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "logit_bias": {"5": 1.0}}, 400, "logit_bias"),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "stream_options": {"include_usage": True}}, 400, None),
    ("/v1/completions", {"model": "no-such-adapter", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": SERVED, "prompt": "word " * 2000}, 400, "prompt"),
    ("/v1/completions", {"model": SERVED, "prompt": "hello", "max_tokens": 5000}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": SERVED, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": SERVED, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"model": SERVED, "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
        400,
        "tools",
    ),
    (
        "/v1/chat/completions",
        {"model": SERVED, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {"model": SERVED, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
    ),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
]


def test_penalties_reach_the_engine(client, worker, make_engine):
    """OpenAI presence/frequency and vLLM repetition penalties change the greedy tokens exactly as the engine's
    SamplingParams do (same tokens as a separate engine given the same params), on both endpoints."""
    from lorafleet.worker.engine.sequence import SamplingParams

    base = {"model": SERVED, "prompt": "the fleet serves", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    pen = {"presence_penalty": 1.5, "frequency_penalty": 2.0, "repetition_penalty": 1.3}
    plain = client.post("/v1/completions", json=base, headers={"X-Request-Id": "pen-off"})
    penal = client.post("/v1/completions", json={**base, **pen}, headers={"X-Request-Id": "pen-on"})
    assert plain.status_code == 200 and penal.status_code == 200, penal.text
    off, on = worker.finished["pen-off"].output_token_ids, worker.finished["pen-on"].output_token_ids
    assert off != on
    prompt_ids = worker.runner.engine.tokenizer("the fleet serves")["input_ids"]
    ref = make_engine().generate([prompt_ids], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **pen))[0]
    assert on == ref.output_token_ids
    assert max(on.count(t) for t in on) < max(off.count(t) for t in off)  # repeats are what it penalises
    chat = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
    r = client.post("/v1/chat/completions", json={**chat, **pen})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_bad_inputs(client, path, body, status, param):
    err = assert_error(client.post(path, json=body), status)
    if param is not None:
        assert err["param"] == param, err


def test_malformed_json_and_unknown_route(client):
    r = client.post(
        "/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"content-type": "application/json"}
    )
    assert_error(r, 400, "BadRequestError")
    assert_error(client.get("/v1/nothing-here"), 404, "NotFoundError")
    assert_error(client.post("/v1/completions", content=b"x", headers={"X-Request-Id": "bad id!"}), 400)
    r = client.post("/v1/completions", json={"model": SERVED, "prompt": "x"}, headers={"X-Request-Id": "has space"})
    assert_error(r, 400)


def test_admin_auth(client, adapters):
    assert_error(client.get("/v1/adapters"), 401, "AuthenticationError")
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
    assert_error(r, 401)
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(client.get("/v1/adapters", headers={"Authorization": "Bearer wrong"}), 403, "PermissionDeniedError")
    assert_error(client.get("/v1/adapters", headers={"Authorization": f"Basic {TOKEN}"}), 401)
    assert_error(
        client.post("/v1/unload_lora_adapter", json={"lora_name": "x"}, headers={"Authorization": "Bearer no"}), 403
    )
    assert client.get("/v1/adapters", headers=AUTH).status_code == 200
    # serving endpoints stay open
    assert client.get("/v1/models").status_code == 200


def test_load_list_serve_unload(client, worker, adapters, adapter_root):
    name = "ad-r2qv"
    r = load(client, name, adapters[name])
    assert r.status_code == 200 and r.text == f"Success: LoRA adapter '{name}' added successfully."
    assert r.headers["content-type"].startswith("text/plain")
    err = assert_error(load(client, name, adapters[name]), 400)
    assert err["message"] == f"The lora adapter '{name}' has already been loaded."

    # host paths only for the admin; anyone else sees the model ids as roots
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models[SERVED]["parent"] is None and models[SERVED]["root"] == SERVED
    assert models[name]["parent"] == SERVED and models[name]["root"] == name
    models = {m["id"]: m for m in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert models[SERVED]["parent"] is None and models[SERVED]["root"] == str(worker.runner.engine.config.model)
    assert models[name]["parent"] == SERVED and models[name]["root"] == str(adapters[name])
    card = client.get(f"/v1/models/{name}").json()
    assert card == {**models[name], "root": name, "created": card["created"]}
    assert_error(client.get("/v1/models/nope"), 404, "NotFoundError")

    listing = client.get("/v1/adapters", headers=AUTH).json()
    assert listing["max_loras"] == 2 and listing["max_lora_rank"] == 8
    entry = {a["name"]: a for a in listing["data"]}[name]
    assert entry["rank"] == 2 and entry["state"] == "loaded" and entry["tier"] in ("host", "gpu", "disk")
    assert entry["path"] == str(adapters[name]) and isinstance(entry["version"], str) and entry["version"]

    r = client.post("/v1/completions", json={"model": name, "prompt": "hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["model"] == name
    entry = {a["name"]: a for a in client.get("/v1/adapters", headers=AUTH).json()["data"]}[name]
    assert entry["tier"] == "gpu" and entry["request_rate"] > 0

    r = client.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=AUTH)
    assert r.status_code == 200 and r.text == f"Success: LoRA adapter '{name}' removed successfully."
    err = assert_error(client.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=AUTH), 404)
    assert err["message"] == f"The lora adapter '{name}' cannot be found."
    assert name not in {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert_error(client.post("/v1/completions", json={"model": name, "prompt": "hello"}), 404)


def test_load_refuses_bad_adapters_and_keeps_serving(client, adapters, tmp_path):
    assert_error(client.post("/v1/load_lora_adapter", json={"lora_name": "x"}, headers=AUTH), 400)
    assert_error(client.post("/v1/unload_lora_adapter", json={}, headers=AUTH), 400)
    assert_error(load(client, SERVED, adapters["ad-r4"]), 400)  # the base model's name
    err = assert_error(load(client, "big", adapters["ad-r16rs"]), 400)  # rank 16 > --max-lora-rank 8
    assert "rank" in err["message"]
    err = assert_error(load(client, "outside", tmp_path), 400)  # not under an adapter root
    assert "root" in err["message"]
    err = assert_error(load(client, "missing", adapters["ad-r4"].parent / "does-not-exist"), 400)
    names = {a["name"] for a in client.get("/v1/adapters", headers=AUTH).json()["data"]}
    assert not names & {"big", "outside", "missing", SERVED}
    r = client.post("/v1/completions", json={"model": SERVED, "prompt": "still serving", "max_tokens": 2})
    assert r.status_code == 200


def _kv_state(worker):
    s = worker.call(lambda e: e.stats())
    return s.num_running, s.num_waiting, s.kv_blocks_used


def test_stream_disconnect_frees_kv(worker, tiny_model):
    body = {"model": SERVED, "prompt": "a long story", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=worker.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body, headers={"X-Request-Id": "leaver"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: "):
                    got += 1
                if got == 3:
                    break
            running, _, used = _kv_state(worker)
            assert running == 1 and used > 0
        closed = time.monotonic()
    assert wait_for(lambda: _kv_state(worker) == (0, 0, 0), timeout=30), _kv_state(worker)
    freed_after = time.monotonic() - closed
    assert freed_after < 1.0
    rec = worker.finished["leaver"]  # finish hooks see the abort (the training stash drops its activations)
    assert rec.finish_reason == "abort" and 3 <= len(rec.output_token_ids) < 900


def test_nonstream_disconnect_frees_kv(worker):
    body = {"model": SERVED, "prompt": "another long story", "max_tokens": 900, "ignore_eos": True}
    with httpx.Client(base_url=worker.url, timeout=httpx.Timeout(30, read=0.3)) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json=body, headers={"X-Request-Id": "impatient"})
    assert wait_for(lambda: _kv_state(worker) == (0, 0, 0), timeout=30), _kv_state(worker)
    assert worker.finished["impatient"].finish_reason == "abort"
    assert len(worker.finished["impatient"].output_token_ids) < 900


def test_duplicate_request_id_in_flight(worker):
    body = {"model": SERVED, "prompt": "dup", "max_tokens": 600, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=worker.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body, headers={"X-Request-Id": "dup-1"}) as r:
            lines = r.iter_lines()  # keep a reference: a collected iterator closes the connection (= abort)
            next(lines)
            assert _kv_state(worker)[0] == 1
            second = c.post("/v1/completions", json={**body, "stream": False}, headers={"X-Request-Id": "dup-1"})
            err = assert_error(second, 400)
            assert err["param"] == "X-Request-Id"
    assert wait_for(lambda: _kv_state(worker) == (0, 0, 0), timeout=30)


def test_unload_while_streaming_finishes_on_started_weights(client, worker, adapters):
    """The stream keeps its adapter version after the unload; new requests for the name get 404 at once."""
    name = "ad-r8v2"
    assert load(client, name, adapters[name]).status_code == 200
    body = {"model": name, "prompt": "tree river mountain", "max_tokens": 150, "temperature": 0, "ignore_eos": True}
    ref = client.post("/v1/completions", json=body, headers={"X-Request-Id": "ref-run"})
    assert ref.status_code == 200
    ref_rec = worker.finished["ref-run"]

    after_unload = 0
    unloaded = threading.Event()
    with httpx.Client(base_url=worker.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}, headers={"X-Request-Id": "mid"}) as r:
            text = []
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                text.append(chunk["choices"][0]["text"])
                if unloaded.is_set():
                    after_unload += 1
                if len(text) == 5:
                    u = client.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=AUTH)
                    assert u.status_code == 200
                    assert_error(client.post("/v1/completions", json={"model": name, "prompt": "x"}), 404)
                    unloaded.set()
    assert after_unload > 0, "the stream ended before the unload: the test proved nothing"
    rec = worker.finished["mid"]
    assert rec.finish_reason == "length"
    assert rec.output_token_ids == ref_rec.output_token_ids
    assert rec.lora_version == ref_rec.lora_version
    assert "".join(text) == ref.json()["choices"][0]["text"]
    assert wait_for(lambda: _kv_state(worker) == (0, 0, 0), timeout=30)


def test_concurrent_mixed_streams_with_cancellations(client, worker, adapters):
    """24 concurrent requests over base + 2 adapters, streaming and not, every third cancelled mid-stream: each
    completed one has exactly the tokens it gets alone, cancelled ones are aborted, and no KV block leaks."""
    import asyncio

    for name in ("ad-r8", "ad-r2qv"):
        assert load(client, name, adapters[name]).status_code in (200, 400)
    models = [SERVED, "ad-r8", "ad-r2qv"]
    jobs = []
    for i in range(24):
        body = {
            "model": models[i % 3],
            "prompt": f"river {i} " * (1 + i % 5),
            "max_tokens": 6 + i % 7,
            "temperature": 0,
            "ignore_eos": True,
            "stream": i % 2 == 0,
        }
        jobs.append((f"cc-{i}", body, i % 3 == 2))
    # the answers alone, one request at a time
    alone = {}
    for rid, body, _cancel in jobs:
        r = client.post("/v1/completions", json={**body, "stream": False}, headers={"X-Request-Id": f"{rid}-alone"})
        assert r.status_code == 200
        alone[rid] = worker.finished[f"{rid}-alone"].output_token_ids

    async def one(c: httpx.AsyncClient, rid: str, body: dict, cancel: bool):
        if not cancel:
            r = await c.post("/v1/completions", json=body, headers={"X-Request-Id": rid})
            assert r.status_code == 200, r.text
            return
        long = {**body, "max_tokens": 500, "stream": True}
        async with c.stream("POST", "/v1/completions", json=long, headers={"X-Request-Id": rid}) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 2:
                    break  # leaving the block closes the connection mid-stream

    async def main():
        async with httpx.AsyncClient(base_url=worker.url, timeout=60) as c:
            await asyncio.gather(*(one(c, rid, body, cancel) for rid, body, cancel in jobs))

    asyncio.run(main())
    for rid, _body, cancel in jobs:
        rec = wait_for(lambda rid=rid: worker.finished.get(rid), timeout=30)
        if cancel:
            assert rec.finish_reason == "abort" and len(rec.output_token_ids) < 500
        else:
            assert rec.finish_reason == "length" and rec.output_token_ids == alone[rid], rid
    assert wait_for(lambda: _kv_state(worker) == (0, 0, 0), timeout=30), _kv_state(worker)
