"""Hostile input over a real server: every malformed body is a JSON 4xx in the OpenAI error shape, the keep-alive
connection stays usable after it, templates come only from the model, a seeded fuzz of request bodies never gets
a 5xx, and the metric page passes `promtool check metrics` (apart from vLLM's colon names).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess

import httpx
import pytest
from lorafleet.worker.api.testing import assert_openai_error

SERVED = "tiny"
ADMIN = "hostile-admin"


@pytest.fixture(scope="module")
def worker(tmp_path_factory, tiny_model, adapter_root, adapters):
    from lorafleet.worker.api.testing import start_worker

    os.environ["LORAFLEET_TRAINING_DIR"] = str(tmp_path_factory.mktemp("hostile-train"))
    try:
        w = start_worker(
            str(tiny_model),
            served_model_name=SERVED,
            admin_token=ADMIN,
            adapter_roots=[str(adapter_root)],
            block_size=4,
            num_kv_blocks=256,
            api={"max_body_bytes": 64 << 10, "feedback_adapters": ("ad-r4",)},
        )
    finally:
        del os.environ["LORAFLEET_TRAINING_DIR"]
    yield w
    w.close()


def _raw(worker, requests: list[bytes]) -> list[tuple[int, dict]]:
    """Sends raw HTTP/1.1 requests over ONE connection; returns (status, JSON body) of each response."""
    out = []
    with socket.create_connection(("127.0.0.1", worker.server.port), timeout=60) as sock:
        f = sock.makefile("rb")
        for req in requests:
            sock.sendall(req)
            status = int(f.readline().split()[1])
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            out.append((status, json.loads(f.read(length)) if length else {}))
    return out


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + extra + "\r\n").encode() + body


HOSTILE = [
    ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 1}'),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfffb"}]}'),
    ("/v1/feedback", b'{"kind": "pair", "adapter": "ad-r4", "prompt": "\\ud800", "completion": "x"}'),
    ("/v1/feedback", b"[" * 5000 + b"]" * 5000),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "temperature": NaN}'),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "temperature": Infinity}'),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "top_p": 1e999}'),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "seed": ' + b"9" * 80 + b"}"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi"'),
    ("/v1/completions", b"\xff\xfe not utf-8"),
    ("/v1/completions", b'{"model": "tiny", "prompt": {"a": ' * 100 + b"1" + b"}" * 200),
    ("/v1/load_lora_adapter", b'{"lora_name": "x", "lora_path": "\\ud800"}'),
    ("/tokenize", b'{"prompt": "\\udc00"}'),
]


def test_hostile_bodies_get_json_4xx_and_the_connection_stays_usable(worker):
    auth = f"Authorization: Bearer {ADMIN}\r\n"
    requests = [_post(path, body, auth) for path, body in HOSTILE]
    requests.append(_post("/v1/completions", b'{"model": "tiny", "prompt": "hello", "max_tokens": 2}'))
    got = _raw(worker, requests)
    for (path, body), (status, payload) in zip(HOSTILE, got[:-1], strict=True):
        assert 400 <= status < 500, (path, body[:80], status, payload)
        assert set(payload) == {"error"} and payload["error"]["code"] == status, payload
    status, payload = got[-1]  # the same connection, after every hostile request
    assert status == 200 and payload["usage"]["completion_tokens"] == 2


def test_body_limit_is_413(worker):
    with httpx.Client(base_url=worker.url, timeout=60) as c:
        big = {"model": SERVED, "prompt": "x" * (70 << 10)}
        assert_openai_error(c.post("/v1/completions", json=big), 413)

        def chunks():
            for _ in range(100):
                yield b" " * 1024

        r = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert_openai_error(r, 413)
        assert c.get("/health").status_code == 200


def test_no_client_templates_and_allow_listed_kwargs_only(worker):
    msg = [{"role": "user", "content": "hi"}]
    with httpx.Client(base_url=worker.url, timeout=60) as c:
        loop = "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}"
        for kwargs in ({"chat_template": loop}, {"template": "x"}, {"unknown_switch": True}, {"thinking": [1]}):
            r = c.post("/v1/chat/completions", json={"model": SERVED, "messages": msg, "chat_template_kwargs": kwargs})
            assert_openai_error(r, 400)
        r = c.post("/v1/chat/completions", json={"model": SERVED, "messages": msg, "chat_template": loop})
        assert_openai_error(r, 400)
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": SERVED,
                "messages": msg,
                "max_tokens": 1,
                "chat_template_kwargs": {"enable_thinking": False},
            },
        )
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "option",
    [
        {"guided_json": {"type": "object"}},
        {"guided_regex": "a+"},
        {"guided_choice": ["a", "b"]},
        {"structured_outputs": {"json": {}}},
        {"truncate_prompt_tokens": 4},
        {"prompt_logprobs": 1},
        {"use_beam_search": True},
        {"stream": True, "stream_options": {"continuous_usage_stats": True}},
    ],
)
def test_unimplemented_options_are_400_never_a_silent_200(worker, option):
    with httpx.Client(base_url=worker.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"model": SERVED, "prompt": "hi", "max_tokens": 1, **option})
        err = assert_openai_error(r, 400)
        assert err["param"] in option or err["param"] == "stream_options", err


def test_tokenize_and_detokenize_round_trip(worker):
    with httpx.Client(base_url=worker.url, timeout=60) as c:
        r = c.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False, "return_token_strs": True})
        body = r.json()
        assert r.status_code == 200 and body["count"] == len(body["tokens"]) > 0
        assert len(body["token_strs"]) == body["count"]
        tok = worker.runner.engine.tokenizer
        assert body["tokens"] == tok("hello world", add_special_tokens=False)["input_ids"]
        assert c.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": "hello world"}
        r = c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["count"] > 1
        assert_openai_error(c.post("/tokenize", json={"prompt": "x", "model": "nope"}), 404)
        assert_openai_error(c.post("/detokenize", json={"tokens": [10**9]}), 400)
        assert_openai_error(c.post("/tokenize", json={}), 400)


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 10**30, 1.5, -0.0, 1e300])
    if kind == 2:
        return rng.choice(["", "tiny", "ad-r4", "..", "a/b", "\n\x1b[31m", "x" * 300, "é😀", "\u0000"])
    if kind == 3:
        return rng.choice(["user", "assistant", "pair", "accept", "reject"])
    if kind == 4:
        return rng.randrange(-3, 40)
    if kind in (5, 6):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["model", "prompt", "messages", "role", "content", "max_tokens", "temperature", "n", "stop", "kind",
            "adapter", "completion", "lora_name", "lora_path", "tokens", "logprobs", "echo", "stream", "top_p",
            "chat_template_kwargs", "requestId", "min_tokens", "seed"]  # fmt: skip
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(6))}


VALID = {
    "/v1/completions": {"model": SERVED, "prompt": "hi", "max_tokens": 1},
    "/v1/chat/completions": {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [1, 2]},
}


def test_seeded_fuzz_of_request_bodies_never_gets_a_5xx(worker):
    rng = random.Random(1515)
    routes = ["/v1/completions", "/v1/chat/completions", "/v1/feedback", "/tokenize", "/detokenize",
              "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/training/jobs"]  # fmt: skip
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=worker.url, timeout=60, headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        for i in range(400):
            route = routes[i % len(routes)]
            body = _random_json(rng)
            if rng.random() < 0.3 and route in VALID:  # a valid body with one random field more (or replaced)
                extra = _random_json(rng, 3)
                body = {**VALID[route], **(extra if isinstance(extra, dict) else {})}
            elif isinstance(body, dict) and rng.random() < 0.6:
                body.setdefault("model", rng.choice([SERVED, "ad-r4", "nope"]))
                body.setdefault("max_tokens", 1)
            raw = json.dumps(body).encode()
            if rng.random() < 0.15:  # byte-level damage too
                pos = rng.randrange(len(raw) + 1)
                raw = raw[:pos] + bytes([rng.randrange(256)]) + raw[pos:]
            r = c.post(route, content=raw, headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (route, raw[:200], r.text[:300])
            assert r.headers["content-type"].startswith(("application/json", "text/plain", "text/event-stream"))
            if r.status_code >= 400:
                assert_openai_error(r, r.status_code) if route not in ("/v1/training/jobs",) else r.json()
        jobs = c.get("/v1/training/jobs").json()["jobs"]
        for job in jobs:  # the fuzz may have started a job: stop it
            c.delete(f"/v1/training/jobs/{job['name']}")
        assert c.get("/health").status_code == 200
        r = c.post("/v1/completions", json={"model": SERVED, "prompt": "hello", "max_tokens": 2})
        assert r.status_code == 200
    assert sum(v for k, v in statuses.items() if k < 300) > 0 and sum(v for k, v in statuses.items() if k >= 400) > 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is installed by hack/prometheus.sh")
def test_metric_names_pass_promtool_apart_from_vllm_colon_names(worker):
    with httpx.Client(base_url=worker.url, timeout=60) as c:
        c.post("/v1/completions", json={"model": SERVED, "prompt": "hello", "max_tokens": 2})
        text = c.get("/metrics").text
    assert "lorafleet_adapters{" in text and "lorafleet_kv_blocks " in text
    res = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    problems = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip() and "vllm:" not in ln]
    assert problems == [], problems
