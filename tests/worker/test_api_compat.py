"""OpenAI/vLLM request options through the official `openai` client against a real `lorafleet worker` process.

What is proven: greedy n > 1 choices equal each other and the n = 1 answer (completions and chat, streamed and not);
seeded n > 1 choice j equals an n = 1 request with seed + j; logprobs equal transformers+peft's float32 log_softmax
through an adapter; top_logprobs are sorted, carry the sampled token and stream the same as not; min_tokens keeps a
stop token from being drawn; stop strings are cut or kept (include_stop_str_in_output) with the string as
stop_reason; a stop token id is its own stop_reason, length none; a list of prompts equals one call per prompt with
OpenAI's choice indices; echo puts the prompt before the completion; echo with logprobs is a 400 naming echo.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import openai
import pytest
import torch
from lorafleet.worker.api.testing import wait_process_ready

SERVED = "tiny"
ADAPTER = "ad-r8"
PROMPT = "the fleet serves many"
GREEDY = {"temperature": 0, "max_tokens": 8}
NO_EOS = {"ignore_eos": True}  # vLLM's extra field: exactly max_tokens tokens from the tiny random model


@pytest.fixture(scope="module")
def worker_url(tiny_model, adapter_root, adapters, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-P", "-m", "lorafleet.cli", "worker", "--model", str(tiny_model), "--device", "cpu"]
    cmd += ["--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port), "--enable-prefix-caching"]
    cmd += ["--adapter-root", str(adapter_root), "--lora-modules", f"{ADAPTER}={adapters[ADAPTER]}"]
    cmd += ["--max-lora-rank", "16", "--block-size", "4", "--num-kv-blocks", "512", "--log-level", "WARNING"]
    log_path = tmp_path_factory.mktemp("compat") / "worker.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAFLEET_TRAINING_DIR": str(log_path.parent / "training")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/tmp")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_process_ready(proc, url, log_path, timeout=240)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def client(worker_url):
    with openai.OpenAI(base_url=f"{worker_url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def _stream_texts(stream) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
    return texts


def test_greedy_n_choices_equal_each_other_and_n1(client):
    one = client.completions.create(model=SERVED, prompt=PROMPT, extra_body=NO_EOS, **GREEDY)
    many = client.completions.create(model=SERVED, prompt=PROMPT, n=3, extra_body=NO_EOS, **GREEDY)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == [one.choices[0].text] * 3
    assert many.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert many.usage.completion_tokens == 3 * one.usage.completion_tokens == 24
    streamed = client.completions.create(model=SERVED, prompt=PROMPT, n=3, stream=True, extra_body=NO_EOS, **GREEDY)
    assert _stream_texts(streamed) == {i: one.choices[0].text for i in range(3)}

    messages = [{"role": "user", "content": "hello fleet"}]
    chat1 = client.chat.completions.create(model=ADAPTER, messages=messages, extra_body=NO_EOS, **GREEDY)
    chat3 = client.chat.completions.create(model=ADAPTER, messages=messages, n=3, extra_body=NO_EOS, **GREEDY)
    assert [c.message.content for c in chat3.choices] == [chat1.choices[0].message.content] * 3
    assert [c.index for c in chat3.choices] == [0, 1, 2]
    streamed = client.chat.completions.create(
        model=ADAPTER, messages=messages, n=3, stream=True, extra_body=NO_EOS, **GREEDY
    )
    assert _stream_texts(streamed) == {i: chat1.choices[0].message.content for i in range(3)}


def test_seeded_n_choices_are_seed_plus_index(client):
    kw = {"temperature": 1.0, "max_tokens": 10, "seed": 7, "extra_body": NO_EOS}
    many = client.completions.create(model=SERVED, prompt=PROMPT, n=3, **kw)
    again = client.completions.create(model=SERVED, prompt=PROMPT, n=3, **kw)
    assert [c.text for c in many.choices] == [c.text for c in again.choices]
    assert len({c.text for c in many.choices}) > 1  # different seeds draw different samples
    for j in range(3):
        alone = client.completions.create(model=SERVED, prompt=PROMPT, **{**kw, "seed": 7 + j})
        assert alone.choices[0].text == many.choices[j].text


def _reference_logprobs(hf_peft, ids: list[int], n_prompt: int, adapter: str | None) -> torch.Tensor:
    """float32 log_softmax of transformers+peft at each position that predicts an output token: [n_out, V]."""
    with torch.no_grad():
        logits = hf_peft(input_ids=torch.tensor([ids]), adapter_names=[adapter or "__base__"]).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)[n_prompt - 1 : len(ids) - 1]


@pytest.mark.parametrize("model", [SERVED, ADAPTER])
def test_logprobs_equal_the_reference_log_softmax(client, tok, hf_peft, hf_greedy, model):
    prompt_ids = tok(PROMPT)["input_ids"]
    k = 5
    r = client.completions.create(model=model, prompt=prompt_ids, logprobs=k, extra_body=NO_EOS, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    adapter = None if model == SERVED else model
    out_ids = hf_greedy(prompt_ids, 8, adapter)  # the engine's greedy tokens equal these (test_api.py)
    ref = _reference_logprobs(hf_peft, prompt_ids + out_ids, len(prompt_ids), adapter)
    assert lp.tokens == [tok.decode([t]) for t in out_ids]
    expected = ref.gather(1, torch.tensor(out_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), expected, atol=1e-4, rtol=1e-4)
    for pos, top in enumerate(lp.top_logprobs):
        vals, ids = ref[pos].topk(k)
        want: dict[str, float] = {}
        for t, v in zip(ids.tolist(), vals.tolist(), strict=True):
            want.setdefault(tok.decode([t]), v)
        assert set(top) == set(want)
        for text, value in top.items():
            assert abs(value - want[text]) <= 1e-4, (pos, text)
    offsets = lp.text_offset
    assert offsets == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]


def test_chat_top_logprobs_sorted_contain_the_sampled_token_and_stream_the_same(client):
    messages = [{"role": "user", "content": "name a river"}]
    kw = {"model": ADAPTER, "messages": messages, "logprobs": True, "top_logprobs": 4, "extra_body": NO_EOS}
    r = client.chat.completions.create(**kw, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 8
    for item in content:
        values = [t.logprob for t in item.top_logprobs]
        assert len(values) == 4 and values == sorted(values, reverse=True)
        assert item.top_logprobs[0].token == item.token and item.top_logprobs[0].logprob == item.logprob  # greedy
        assert item.bytes == list(item.token.encode("utf-8"))
    streamed = []
    for chunk in client.chat.completions.create(**kw, stream=True, **GREEDY):
        for c in chunk.choices:
            if c.logprobs is not None:
                streamed += c.logprobs.content
    assert [i.token for i in streamed] == [i.token for i in content]
    # the same within float32 bounds (the prefix cache and batch shapes change the kernels' summation order)
    torch.testing.assert_close([i.logprob for i in streamed], [i.logprob for i in content], atol=1e-4, rtol=1e-4)
    # sampling: the completions shape holds the sampled token among its alternatives, with its own logprob
    s = client.completions.create(
        model=SERVED, prompt=PROMPT, logprobs=2, temperature=1.0, seed=3, max_tokens=12, extra_body=NO_EOS
    )
    lp = s.choices[0].logprobs
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert token in top and 1 <= len(top) <= 3
        if "\ufffd" not in token:  # pieces of characters share that text: its entry is the likeliest piece's
            assert top[token] == value
        assert all(v <= 0.0 for v in top.values())


def test_min_tokens_keeps_a_stop_token_from_being_drawn(client, tok, hf_peft):
    prompt_ids = tok(PROMPT)["input_ids"]
    ref = _reference_logprobs(hf_peft, prompt_ids + [0], len(prompt_ids), None)[0]
    first, second = ref.topk(2).indices.tolist()
    r = client.completions.create(model=SERVED, prompt=prompt_ids, extra_body={"stop_token_ids": [first]}, **GREEDY)
    c = r.choices[0]
    assert (c.finish_reason, c.stop_reason, r.usage.completion_tokens) == ("stop", first, 1)
    assert c.text == ""  # the stop token is not part of the text
    r = client.completions.create(
        model=SERVED, prompt=prompt_ids, logprobs=2, extra_body={"stop_token_ids": [first], "min_tokens": 4}, **GREEDY
    )
    c = r.choices[0]
    assert r.usage.completion_tokens >= 4
    assert c.logprobs.tokens[0] == tok.decode([second])  # the top token is masked: greedy takes the next one
    assert c.logprobs.top_logprobs[0][tok.decode([first])] == pytest.approx(float(ref[first]), abs=1e-4)  # raw
    long = client.completions.create(model=SERVED, prompt=prompt_ids, extra_body=NO_EOS, **GREEDY)
    assert (long.choices[0].finish_reason, long.choices[0].stop_reason) == ("length", None)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_or_kept_with_the_string_as_stop_reason(client, stream):
    full = client.completions.create(model=SERVED, prompt=PROMPT, extra_body=NO_EOS, **GREEDY).choices[0].text
    start = next(i for i in range(1, len(full) - 3) if "\ufffd" not in full[i : i + 3])  # whole characters
    stop = full[start : start + 3]
    at = full.index(stop)

    def ask(**extra):
        body = {"ignore_eos": True, **extra}
        if not stream:
            c = client.completions.create(model=SERVED, prompt=PROMPT, stop=[stop], extra_body=body, **GREEDY)
            return c.choices[0].text, c.choices[0].finish_reason, c.choices[0].stop_reason
        text, last = "", None
        for chunk in client.completions.create(
            model=SERVED, prompt=PROMPT, stop=[stop], stream=True, extra_body=body, **GREEDY
        ):
            text += chunk.choices[0].text
            last = chunk.choices[0]
        return text, last.finish_reason, last.stop_reason

    assert ask() == (full[:at], "stop", stop)
    assert ask(include_stop_str_in_output=True) == (full[: at + 3], "stop", stop)


@pytest.mark.parametrize("as_ids", [False, True])
def test_a_list_of_prompts_equals_separate_calls(client, tok, as_ids):
    texts = ["hello world", "the capital city of", "red green blue"]
    prompts = [tok(t)["input_ids"] for t in texts] if as_ids else texts  # OpenAI's list[str] or list[list[int]]
    batch = client.completions.create(model=ADAPTER, prompt=prompts, n=2, extra_body=NO_EOS, **GREEDY)
    assert [c.index for c in batch.choices] == list(range(6))  # index = prompt index x n + j
    prompt_tokens = 0
    for p, prompt in enumerate(prompts):
        alone = client.completions.create(model=ADAPTER, prompt=prompt, extra_body=NO_EOS, **GREEDY)
        prompt_tokens += alone.usage.prompt_tokens
        assert [batch.choices[2 * p + j].text for j in range(2)] == [alone.choices[0].text] * 2
    assert batch.usage.prompt_tokens == prompt_tokens
    assert batch.usage.completion_tokens == 6 * 8


def test_echo_puts_the_prompt_first_and_refuses_logprobs(client, tok):
    plain = client.completions.create(model=SERVED, prompt=PROMPT, extra_body=NO_EOS, **GREEDY).choices[0].text
    echoed = client.completions.create(model=SERVED, prompt=PROMPT, echo=True, extra_body=NO_EOS, **GREEDY)
    assert echoed.choices[0].text == PROMPT + plain
    ids = tok(PROMPT)["input_ids"]
    by_ids = client.completions.create(model=SERVED, prompt=ids, echo=True, extra_body=NO_EOS, **GREEDY)
    assert by_ids.choices[0].text == tok.decode(ids) + plain
    streamed = client.completions.create(
        model=SERVED, prompt=PROMPT, echo=True, stream=True, extra_body=NO_EOS, **GREEDY
    )
    assert _stream_texts(streamed) == {0: PROMPT + plain}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=SERVED, prompt=PROMPT, echo=True, logprobs=1, **GREEDY)
    assert err.value.status_code == 400 and err.value.body["param"] == "echo"
