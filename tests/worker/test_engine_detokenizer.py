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
