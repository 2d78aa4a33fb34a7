"""Tokenizing, detokenizing and chat-template rendering for the HTTP layer, off the event loop and time-bounded.

Why a thread pool of its own: a 1 MiB prompt takes the tokenizer hundreds of milliseconds, and a chat template is
a Jinja program; either on the asyncio loop stalls every other request (`/health` included) for that long. These
threads are few (a burst of hostile prompts queues here instead of taking every thread Starlette has, so feedback
fsyncs and engine calls go on). Templates come only from the model (or the operator): a client may not send one,
and `chat_template_kwargs` takes only the allow-listed switches that real templates read. transformers renders
them in Jinja's immutable sandbox; a render that runs past `timeout_s` answers 400.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
from collections.abc import Callable
from typing import Any, TypeVar

from lorafleet.worker.api.errors import APIError

T = TypeVar("T")
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="lorafleet-tokenize")

# keys chat templates of common models read (Qwen3 / DeepSeek / gpt-oss thinking switches); scalar values only
TEMPLATE_KWARGS = frozenset({"enable_thinking", "thinking", "reasoning_effort", "add_bos_token"})


async def off_loop(fn: Callable[..., T], *args: Any, timeout_s: float | None = None, what: str = "work") -> T:
    """Runs `fn(*args)` in the tokenizer pool; past `timeout_s` the request gets a 400 (the thread finishes alone:
    a thread cannot be killed, which is why only bounded inputs and trusted templates get here)."""
    future = asyncio.get_running_loop().run_in_executor(_POOL, lambda: fn(*args))
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout_s)
    except TimeoutError as exc:
        raise APIError(400, f"{what} took longer than {timeout_s:g} s") from exc


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


def encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool, kwargs: dict) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except Exception as exc:  # noqa: BLE001 - template errors (e.g. role order) are the client's
        raise APIError(400, f"cannot apply the chat template: {type(exc).__name__}: {exc}", param="messages") from exc


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids)
