"""The `logprobs` objects of OpenAI's responses, from the engine's per-token entries (worker/engine/logprobs.py).

Completions (legacy shape): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, where each
`top_logprobs` entry maps token text to logprob for the `logprobs` most likely tokens plus the sampled one (vLLM's
shape: up to k + 1 keys). Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal"}`
with exactly `top_logprobs` alternatives, most likely first. Token text is the token decoded alone, as vLLM shows it
(a piece of a multi-byte character decodes to U+FFFD; `bytes` are that text's UTF-8).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lorafleet.worker.engine.logprobs import TokenLogprob


class TokenText:
    """Token id -> its text alone, memoised per response (a token repeats in the alternatives of many positions)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._memo: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._memo.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id])
            self._memo[token_id] = text
        return text


def _finite(x: float) -> float:
    """JSON has no -Infinity: a logprob below -9999 (a probability that underflows float32) is clamped to -9999.0,
    as vLLM does."""
    return x if x > -9999.0 else -9999.0


def completion_logprobs(
    entries: Sequence[TokenLogprob], text_of: TokenText, num_top: int, initial_offset: int = 0
) -> dict[str, Any]:
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = initial_offset
    for e in entries:
        text = text_of(e.token_id)
        tokens.append(text)
        token_logprobs.append(_finite(e.logprob))
        alternatives: dict[str, float] = {}
        for t, lp in e.top[:num_top]:
            alternatives.setdefault(text_of(t), _finite(lp))  # two ids of one text: the likelier one's logprob
        alternatives.setdefault(text, _finite(e.logprob))
        top.append(alternatives)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(entries: Sequence[TokenLogprob], text_of: TokenText, num_top: int) -> dict[str, Any]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = text_of(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8", errors="replace"))}

    content = [
        {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top[:num_top]]} for e in entries
    ]
    return {"content": content, "refusal": None}
