"""The event loop stays free under heavy requests, over a real server: each body is parsed once, tokenization and
the JSON of big answers run in the offload pool (the loop answers `/health` and `/ready` while a tokenization is
held in flight by a barrier), large work is admitted up to a bound and refused with 429 past it while small
requests go on, and `/tokenize` answers are capped.
"""

from __future__ import annotations

import json
import os
import sys
import threading

import httpx
import pytest
from lorafleet.worker.api import tokenization
from lorafleet.worker.api.offload import HEAVY, SLICE, json_bytes
from lorafleet.worker.api.testing import assert_openai_error, wait_for

SERVED = "tiny"
BIG = "river stone " * (HEAVY // 12 + 100)  # a prompt above HEAVY characters: heavy work
assert len(BIG) > HEAVY


@pytest.fixture(scope="module")
def worker(tmp_path_factory, tiny_model):
    from lorafleet.worker.api.testing import start_worker

    os.environ["LORAFLEET_TRAINING_DIR"] = str(tmp_path_factory.mktemp("offload-train"))
    try:
        w = start_worker(
            str(tiny_model),
            served_model_name=SERVED,
            block_size=4,
            num_kv_blocks=256,
            api={"offload_threads": 1, "offload_backlog": 1, "max_tokenize_tokens": 1 << 17},
        )
    finally:
        del os.environ["LORAFLEET_TRAINING_DIR"]
    yield w
    w.close()


class Barrier:
    """Replaces `tokenization.encode`: a call for a prompt longer than HEAVY says it started, records its thread
    and waits for `release`; every other call goes straight through."""

    def __init__(self, monkeypatch) -> None:
        self.real = tokenization.encode
        self.started = threading.Event()
        self.release = threading.Event()
        self.threads: list[str] = []
        monkeypatch.setattr(tokenization, "encode", self)

    def __call__(self, tokenizer, text, add_special_tokens=True, limit=None):
        if len(text) > HEAVY:
            self.threads.append(threading.current_thread().name)
            self.started.set()
            assert self.release.wait(60)
        return self.real(tokenizer, text, add_special_tokens, limit)


def _post_in_thread(url: str, path: str, body: dict, out: list) -> threading.Thread:
    def go() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            out.append(c.post(path, json=body))

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_each_body_is_parsed_once(worker, monkeypatch):
    """json.loads sees each request body exactly once (the guard's parse), however big, on every OpenAI route."""
    real_loads = json.loads
    seen: list[int] = []
    bodies: dict[str, bytes] = {
        "/v1/completions": json.dumps({"model": SERVED, "prompt": "a river", "max_tokens": 2}).encode(),
        "/v1/chat/completions": json.dumps(
            {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        ).encode(),
        "/tokenize": json.dumps({"model": SERVED, "prompt": BIG}).encode(),
        "/detokenize": json.dumps({"model": SERVED, "tokens": [1, 2, 3] * (HEAVY // 6)}).encode(),
    }

    def counting(s, *args, **kwargs):
        if isinstance(s, bytes | bytearray | str) and any(s == b or s == b.decode() for b in bodies.values()):
            seen.append(len(s))
        return real_loads(s, *args, **kwargs)

    monkeypatch.setattr(json, "loads", counting)
    with httpx.Client(base_url=worker.url, timeout=120) as c:
        for path, raw in bodies.items():
            seen.clear()
            r = c.post(path, content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == 200, (path, r.text)
            assert seen == [len(raw)], (path, seen)


def test_health_and_ready_answer_while_a_huge_tokenization_is_in_flight(worker, monkeypatch):
    """The tokenization is held inside the pool by a barrier; /health and /ready still answer (they would hang
    until the barrier opens if the loop ran it); the answer is the tokenizer's, produced off the loop."""
    barrier = Barrier(monkeypatch)
    serialised_in: list[str] = []
    real_json_bytes = tokenization.json_bytes

    def recording(content):
        serialised_in.append(threading.current_thread().name)
        return real_json_bytes(content)

    monkeypatch.setattr(tokenization, "json_bytes", recording)
    out: list[httpx.Response] = []
    t = _post_in_thread(worker.url, "/tokenize", {"model": SERVED, "prompt": BIG}, out)
    try:
        assert barrier.started.wait(60)
        with httpx.Client(base_url=worker.url, timeout=30) as c:
            for _ in range(5):
                assert c.get("/health").status_code == 200
                assert c.get("/ready").json() == {"status": "ready"}
        assert not out  # still in flight: the answers above came while it was held
    finally:
        barrier.release.set()
        t.join(120)
    assert out[0].status_code == 200, out[0].text
    expected = barrier.real(worker.runner.engine.tokenizer, BIG, True)
    assert out[0].json()["tokens"] == expected and out[0].json()["count"] == len(expected)
    loop_thread = worker.server._thread.name
    assert barrier.threads and all(n.startswith("lorafleet-offload") for n in barrier.threads)
    assert serialised_in and all(n.startswith("lorafleet-offload") and n != loop_thread for n in serialised_in)


def test_large_work_is_admitted_up_to_the_bound_and_small_requests_go_on(worker, monkeypatch):
    """1 thread + 1 backlog: one big tokenization held, a second admitted (waiting), the third is a JSON 429 with
    Retry-After at once; a small completion still answers 200 meanwhile; once released both big ones finish."""
    offload = worker.app.state.offload
    barrier = Barrier(monkeypatch)
    refused_before = offload.refused
    outs: list[list[httpx.Response]] = [[], []]
    body = {"model": SERVED, "prompt": BIG}
    threads = [_post_in_thread(worker.url, "/tokenize", body, outs[0])]
    try:
        assert barrier.started.wait(60)
        threads.append(_post_in_thread(worker.url, "/tokenize", body, outs[1]))
        assert wait_for(lambda: offload.heavy_admitted == 2, timeout=60)
        with httpx.Client(base_url=worker.url, timeout=60) as c:
            r = c.post("/tokenize", json=body)
            assert_openai_error(r, 429, "RateLimitError")
            assert r.headers["retry-after"] == "1"
            small = c.post("/v1/completions", json={"model": SERVED, "prompt": "a river", "max_tokens": 2})
            assert small.status_code == 200, small.text
            assert c.get("/health").status_code == 200
        assert offload.refused == refused_before + 1
    finally:
        barrier.release.set()
        for t in threads:
            t.join(120)
    assert [o[0].status_code for o in outs] == [200, 200]
    assert wait_for(lambda: offload.heavy_admitted == 0, timeout=30)


def test_tokenize_answer_is_capped(worker):
    """More tokens than max_tokenize_tokens is a JSON 400 that tells the count; at the cap the answer is whole."""
    tok = worker.runner.engine.tokenizer
    cap = worker.app.state.settings.max_tokenize_tokens
    text = "a b " * cap
    count = len(tokenization.encode(tok, text, True))
    assert count > cap
    with httpx.Client(base_url=worker.url, timeout=120) as c:
        err = assert_openai_error(c.post("/tokenize", json={"model": SERVED, "prompt": text}), 400)
        assert f"the input has {count} tokens" in err["message"] and str(cap) in err["message"]


@pytest.mark.parametrize("n", [0, 1, SLICE - 1, SLICE, SLICE + 1, 3 * SLICE + 7])
def test_json_bytes_equals_the_one_shot_encoding(n):
    """Slice-by-slice serialisation gives exactly Starlette JSONResponse's bytes (ints, unicode strings, None)."""
    content = {
        "count": n,
        "max_model_len": None,
        "tokens": list(range(n)),
        "token_strs": [f'Ġé\u2603{i}"\\' for i in range(n)],
        "nested": {"a": [1.5, "x"]},
    }
    expected = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    assert json_bytes(content) == expected
    assert json_bytes([1, 2]) == b"[1,2]"


@pytest.mark.parametrize("add_special", [True, False])
def test_encode_is_the_tokenizers_call_and_counts_before_listing(tiny_model, add_special):
    """`encode` gives `tokenizer(text)["input_ids"]` exactly (special-token text included); past `limit` it raises
    with the full count instead of returning the ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = ["", "a river", "<s> hello </s> <pad>", "Ġé\u2603 naïve 日本語 \n\t x" * 50, BIG]
    for text in texts:
        expected = tok(text, add_special_tokens=add_special)["input_ids"]
        assert tokenization.encode(tok, text, add_special) == expected
        assert tokenization.encode(tok, text, add_special, limit=len(expected)) == expected
        if expected:
            with pytest.raises(tokenization.TooManyTokens) as info:
                tokenization.encode(tok, text, add_special, limit=len(expected) - 1)
            assert info.value.count == len(expected)


def test_a_prompt_over_the_context_is_refused_with_its_count(worker):
    """A completion prompt longer than the context: vLLM's 400 naming the prompt's real token count."""
    tok = worker.runner.engine.tokenizer
    count = len(tokenization.encode(tok, BIG, True))
    with httpx.Client(base_url=worker.url, timeout=120) as c:
        r = c.post("/v1/completions", json={"model": SERVED, "prompt": BIG, "max_tokens": 1})
    err = assert_openai_error(r, 400)
    assert f"your prompt has {count} tokens" in err["message"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_heavy_work_runs_niced_and_light_work_at_the_loops_priority():
    """A flood of megabyte tokenizations must leave the CPU to the event loop and the engine thread: the heavy pool's
    threads run at +HEAVY_NICE, the light pool's (ordinary requests) at the process's own niceness."""
    from lorafleet.worker.api.offload import HEAVY_NICE, Offload

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    own = nice()
    pool = Offload(threads=2, backlog=0)
    try:
        heavy = pool.submit(nice, cost=HEAVY + 1).result(timeout=30)
        light = pool.submit(nice, cost=1).result(timeout=30)
    finally:
        pool.close()
    assert (heavy, light) == (min(19, own + HEAVY_NICE), own)
    assert nice() == own  # the caller's own priority is untouched
