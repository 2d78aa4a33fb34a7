"""Incremental detokenization equals a one-shot decode (multi-byte characters, leading spaces) on both paths."""

from __future__ import annotations

import pytest
from lorafleet.worker.engine.detokenizer import IncrementalDetokenizer

TEXT = " Hello world, the café costs 5€ and 日本語 text 🙂 done"


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


@pytest.mark.parametrize("stream", [True, False])
def test_incremental_text_equals_decode(tok, stream):
    ids = tok.encode("one two" + TEXT, add_special_tokens=False)
    prompt, out = ids[:3], ids[3:]
    d = IncrementalDetokenizer(tok, prompt)
    if not stream:
        d._stream = None
    seen = []
    for t in out:
        d.append(t)
        seen.append(d.text)
        assert "\ufffd" not in d.text  # incomplete characters are held back, never emitted
    d.flush()
    assert d.text == tok.decode(out, skip_special_tokens=True)
    assert all(a == b[: len(a)] for a, b in zip(seen, seen[1:], strict=False))  # text only ever grows


def test_stop_string_across_tokens_and_flush_of_incomplete_tail(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [5], stop=["costs 5"])
    hit = False
    for t in ids:
        if d.append(t):
            hit = True
            break
    assert hit and d.text == TEXT[: TEXT.index("costs 5")]
    emoji = tok.encode("🙂", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [5])
    for t in emoji[:-1]:
        d.append(t)
    assert d.text == ""
    d.flush()
    assert d.text.endswith("\ufffd")  # an unfinished character at the very end is shown, as HF decode does


def _incremental(tok, prompt, out, stream=True):
    d = IncrementalDetokenizer(tok, prompt)
    if not stream:
        d._stream = None
    for t in out:
        d.append(t)
    d.flush()
    return d.text


def test_final_only_text_equals_the_incremental_text(tok):
    """A non-streaming request's output is decoded once at the end (`decode_all`); it must read exactly as the
    token-by-token text would: leading space of the first token, multi-byte characters, an unfinished tail."""
    import random

    ids = tok.encode("one two" + TEXT, add_special_tokens=False)
    emoji = tok.encode("🙂", add_special_tokens=False)
    cases = [(ids[:3], ids[3:]), ([5], ids), (ids[:2], ids[2:] + emoji[:-1]), ([], ids[:4])]
    rng = random.Random(0)
    pool = ["the", " a", " café", "日本", "語", " 🙂", "5€", ",", " x", "\n", "  ", "Ω", "über", " naïve", "!"]

    def text() -> str:
        return "".join(rng.choice(pool) for _ in range(rng.randrange(1, 12)))

    for _ in range(100):  # prompts are text; an output may end inside a character (cut by max_tokens)
        out = tok.encode(text(), add_special_tokens=False)
        cut = rng.randrange(len(out)) + 1 if rng.random() < 0.3 else len(out)
        cases.append((tok.encode(text(), add_special_tokens=False), out[:cut]))
    for prompt, out in cases:
        d = IncrementalDetokenizer(tok, prompt)
        d.decode_all(out)
        assert d.text == _incremental(tok, prompt, out), (prompt, out)


def test_engine_decodes_a_non_streaming_output_once(tiny_model, monkeypatch):
    """`incremental_text=False` (what the API sets for `stream: false`): the same tokens and final text, no
    per-token decoding in the steps; stop strings still stop (they need the text token by token)."""
    from lorafleet.worker.config import EngineConfig
    from lorafleet.worker.engine.llm_engine import LLMEngine
    from lorafleet.worker.engine.sequence import SamplingParams

    eng = LLMEngine(EngineConfig(model=str(tiny_model), device="cpu", kv_cache_bytes=8 << 20))
    prompts = [[5, 17, 300, 41], [99, 7], [100, 200, 300]]
    calls = {"append": 0}
    real = IncrementalDetokenizer.append

    def counted(self, token_id, *args, **kwargs):
        calls["append"] += 1
        return real(self, token_id, *args, **kwargs)

    monkeypatch.setattr(IncrementalDetokenizer, "append", counted)

    def run(**kw):
        calls["append"] = 0
        outs = []
        for i, p in enumerate(prompts):
            eng.add_request(f"{kw}-{i}", p, SamplingParams(temperature=0.0, max_tokens=24, **kw))
        while eng.has_unfinished_requests():
            outs += eng.step()
        finals = {o.request_id.rsplit("-", 1)[1]: o for o in outs if o.finished}
        return outs, finals, calls["append"]

    _, inc, n_inc = run(incremental_text=True)
    outs, once, n_once = run(incremental_text=False)
    assert n_inc > 0 and n_once == 0  # no token went through the incremental detokenizer
    for k in inc:
        assert once[k].all_token_ids == inc[k].all_token_ids and once[k].finish_reason == inc[k].finish_reason
        assert once[k].text == inc[k].text and once[k].text
    assert all(o.text == "" for o in outs if not o.finished)  # nobody reads a non-streaming request's partial text
    stop = inc["0"].text[3:6]
    _, stopped, n_stop = run(incremental_text=False, stop=[stop])
    assert n_stop > 0 and stopped["0"].finish_reason == "stop" and stop not in stopped["0"].text
