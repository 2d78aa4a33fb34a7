"""Tokenizing, detokenizing and chat-template rendering for the HTTP layer: the jobs the routes run in the offload
pool (`offload.py`), never on the event loop.

Why off the loop: a 1 MiB prompt takes the tokenizer hundreds of milliseconds, a chat template is a Jinja program,
and a 400k-token `/tokenize` answer is megabytes of JSON; any of them on the asyncio loop stalls every other request
(`/health` included) for that long. Templates come only from the model (or the operator): a client may not send
one, and `chat_template_kwargs` takes only the allow-listed switches that real templates read. transformers renders
them in Jinja's immutable sandbox; a render that runs past its time limit answers 400.
"""

from __future__ import annotations

import math
from typing import Any

from lorafleet.worker.api.errors import APIError
from lorafleet.worker.api.offload import json_bytes

# keys chat templates of common models read (Qwen3 / DeepSeek / gpt-oss thinking switches); scalar values only
TEMPLATE_KWARGS = frozenset({"enable_thinking", "thinking", "reasoning_effort", "add_bos_token"})


def template_kwargs(given: dict[str, Any] | None) -> dict[str, Any]:
    """The allow-listed `chat_template_kwargs`; a template, another key or a non-scalar value is a 400."""
    out: dict[str, Any] = {}
    for key, value in (given or {}).items():
        if key in ("chat_template", "template"):
            raise APIError(400, "client-supplied chat templates are not accepted", param=f"chat_template_kwargs.{key}")
        if key not in TEMPLATE_KWARGS:
            raise APIError(
                400,
                f"chat_template_kwargs.{key} is not supported (allowed: {sorted(TEMPLATE_KWARGS)})",
                param=f"chat_template_kwargs.{key}",
            )
        if not (value is None or isinstance(value, bool | str | int) or _finite(value)) or (
            isinstance(value, str) and len(value) > 64
        ):
            raise APIError(
                400, f"chat_template_kwargs.{key} must be a short scalar", param=f"chat_template_kwargs.{key}"
            )
        out[key] = value
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)


class TooManyTokens(Exception):
    """The text has more tokens than the caller can use; `count` says how many."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


def encode(tokenizer: Any, text: str, add_special_tokens: bool = True, limit: int | None = None) -> list[int]:
    """The token ids of `text`, as `tokenizer(text)["input_ids"]`; TooManyTokens past `limit` tokens.

    Why the Rust `encode_batch` of a fast tokenizer directly: it is what transformers' `__call__` runs, and the one
    call of the tokenizers binding that releases the GIL (`encode` holds it for the whole text); and the count is
    checked before any Python list is built: turning 400k ids (and transformers' attention mask and offsets) into
    Python ints is a C call that holds the GIL, so the event loop would wait for it, for a prompt refused anyway.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "split_special_tokens", False) or backend.encode_special_tokens:
        ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        if limit is not None and len(ids) > limit:
            raise TooManyTokens(len(ids))
        return ids
    (encoding,) = backend.encode_batch([text], add_special_tokens=add_special_tokens)
    if limit is not None and len(encoding) > limit:
        raise TooManyTokens(len(encoding))
    return encoding.ids


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool, kwargs: dict) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except Exception as exc:  # noqa: BLE001 - template errors (e.g. role order) are the client's
        raise APIError(400, f"cannot apply the chat template: {type(exc).__name__}: {exc}", param="messages") from exc


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids)


def check_ids(ids: list[int], vocab: int, param: str) -> None:
    """A 400 unless every token id is in [0, vocab) (a long list: run it in the pool, it is a Python loop)."""
    if any(t < 0 or t >= vocab for t in ids):
        raise APIError(400, f"token ids must be in [0, {vocab})", param=param)


def tokenize_answer(
    tokenizer: Any, text: str, add_special: bool, token_strs: bool, max_model_len: int | None, max_tokens: int
) -> bytes:
    """vLLM's `/tokenize` answer as JSON bytes; more than `max_tokens` tokens is a 400 that gives the count (a list
    that long is no prompt any served model takes, and it is megabytes per request)."""
    try:
        ids = encode(tokenizer, text, add_special, limit=max_tokens)
    except TooManyTokens as exc:
        raise APIError(
            400,
            f"the input has {exc.count} tokens; /tokenize lists at most {max_tokens} (model context: {max_model_len})",
            param="prompt",
        ) from exc
    strs = tokenizer.convert_ids_to_tokens(ids) if token_strs else None
    return json_bytes({"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs})


def detokenize_answer(tokenizer: Any, ids: list[int]) -> bytes:
    """vLLM's `/detokenize` answer as JSON bytes."""
    check_ids(ids, len(tokenizer), "tokens")
    return json_bytes({"prompt": decode(tokenizer, ids)})
