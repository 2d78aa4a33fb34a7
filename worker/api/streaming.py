"""The SSE body of a streamed completion or chat completion: the chunks of every choice, interleaved as they come.

Each choice is one engine request; a task per choice moves its outputs onto one queue, so the chunks of n choices
(or of several prompts) go out in the order the engine produced them, each carrying its choice `index`. Text is sent
as deltas of the engine's cumulative detokenised text, so the concatenation of a choice's chunks equals the
non-streaming text of the same greedy request. With stop strings the last (longest stop string - 1) characters are
held back until the choice finishes: the engine cuts the text at a complete stop string, and a partial match must
never have been sent (vLLM does the same). Logprobs go with the chunk of their tokens, whether or not its text is
held back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from lorafleet.worker.api.errors import error_body
from lorafleet.worker.api.logprobs import TokenText, chat_logprobs, completion_logprobs
from lorafleet.worker.api.serving import Choice, Prepared, finish_reason, usage
from lorafleet.worker.api.sse import SSE_DONE, sse
from lorafleet.worker.request_stream import EngineDeadError, RequestStream


@dataclass
class _ChoiceState:
    choice: Choice
    sent_text: str = ""
    sent_logprobs: int = 0
    text_offset: int = 0
    completion_tokens: int = 0

    def text_delta(self, out: Any) -> str:
        text = out.text or ""
        holdback = self.choice.holdback
        visible = text if out.finished or holdback <= 0 else text[: max(0, len(text) - holdback)]
        delta = visible[len(self.sent_text) :] if visible.startswith(self.sent_text) else ""
        self.sent_text += delta
        return delta

    def new_logprobs(self, out: Any) -> list:
        entries = out.logprobs or []
        new = entries[self.sent_logprobs :]
        self.sent_logprobs = len(entries)
        return new


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """(position in `streams`, output) as the engine delivers them; an engine failure is raised after the rest."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                q.put_nowait((i, out))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put_nowait((i, exc))
        finally:
            q.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            i, item = await q.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def closer(streams: list[RequestStream]) -> Callable[[], None]:
    """What the SSE response runs when it ends: every choice's request aborted unless it finished."""

    def close() -> None:
        for stream in streams:
            stream.close()

    return close


async def stream_events(
    streams: list[RequestStream],
    prep: Prepared,
    include_usage: bool,
    kind: str,
    tokenizer: Any,
    num_logprobs: int | None,
    echo: bool = False,
) -> AsyncIterator[str]:
    """SSE chunks: a completion chunk carries `text`; a chat chunk a `delta` (after a first role-only chunk per
    choice). `num_logprobs` (None: none) is the top-k each token's logprobs carry."""
    chat = kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"
    base = {"id": prep.request_id, "object": obj, "created": prep.created, "model": prep.model}
    states = [_ChoiceState(c) for c in prep.choices]
    text_of = TokenText(tokenizer)
    for st in states:
        i = st.choice.index
        if chat:
            first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            yield sse({**base, "choices": [first]})
        elif echo and st.choice.prompt_text:
            st.text_offset = len(st.choice.prompt_text)
            echoed = {"index": i, "text": st.choice.prompt_text, "logprobs": None, "finish_reason": None}
            yield sse({**base, "choices": [{**echoed, "stop_reason": None}]})
    try:
        async for k, out in _merged(streams):
            st = states[k]
            st.completion_tokens = out.num_output_tokens
            reason = finish_reason(out) if out.finished else None
            delta = st.text_delta(out)
            entries = st.new_logprobs(out) if num_logprobs is not None else []
            if not delta and not entries and reason is None:
                continue
            yield sse(
                {**base, "choices": [_chunk_choice(st, out, delta, entries, reason, chat, text_of, num_logprobs)]}
            )
    except EngineDeadError as exc:
        yield sse(error_body(503, f"engine is not running: {exc}"))
    if include_usage:
        completion = sum(st.completion_tokens for st in states)
        yield sse({**base, "choices": [], "usage": usage(prep.num_prompt_tokens, completion)})
    yield SSE_DONE


def _chunk_choice(
    st: _ChoiceState,
    out: Any,
    delta: str,
    entries: list,
    reason: str | None,
    chat: bool,
    text_of: TokenText,
    num_logprobs: int | None,
) -> dict[str, Any]:
    logprobs = None
    if num_logprobs is not None and (entries or reason is None):
        if chat:
            logprobs = chat_logprobs(entries, text_of, num_logprobs)
        else:
            logprobs = completion_logprobs(entries, text_of, num_logprobs, st.text_offset)
            st.text_offset += sum(len(t) for t in logprobs["tokens"])
    stop_reason = out.stop_reason if out.finished else None
    key, value = ("delta", {"content": delta} if delta else {}) if chat else ("text", delta)
    return {
        "index": st.choice.index,
        key: value,
        "logprobs": logprobs,
        "finish_reason": reason,
        "stop_reason": stop_reason,
    }
