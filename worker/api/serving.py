"""What completions and chat share: model → adapter resolution, request ids, sampling params, admission, collection.

Admission errors map to HTTP statuses here, in one place, so both endpoints answer the same way:
unknown adapter 404, bad input or prompt over the context 400, too many waiting 429 (Retry-After), engine dead or
still loading 503. A request with n > 1 or several prompts becomes one engine request per choice (`plan_choices`),
admitted together (all or none) and collected together; the engine's prefix cache, when on, shares their prompt's
full KV blocks once the first of them has computed them.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request
from lorafleet.worker.api.errors import APIError
from lorafleet.worker.api.protocol import _SamplingFields
from lorafleet.worker.api.settings import ApiSettings
from lorafleet.worker.async_engine import (
    AsyncEngineRunner,
    DuplicateRequestError,
    EngineDeadError,
    EngineNotReadyError,
    OverloadedError,
    RequestStream,
)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@dataclass
class Choice:
    """One choice of a response: its OpenAI `index`, the engine request that produces it, and its prompt."""

    index: int
    request_id: str
    prompt_index: int
    prompt_token_ids: list[int]
    prompt_text: str | None  # the text `echo` puts before the completion
    params: Any

    @property
    def holdback(self) -> int:
        return max((len(s) for s in getattr(self.params, "stop", []) or []), default=0) - 1


@dataclass
class Prepared:
    """A validated request ready for admission: every choice of it."""

    request_id: str
    model: str
    lora_name: str | None
    choices: list[Choice]
    created: int
    n: int = 1

    @property
    def num_prompt_tokens(self) -> int:
        """Each prompt counted once, however many choices it has (OpenAI's and vLLM's usage)."""
        return sum(len(c.prompt_token_ids) for c in self.choices if c.index % self.n == 0)


def plan_choices(request_id: str, prompts: list[tuple[list[int], str | None, Any]], n: int) -> list[Choice]:
    """OpenAI's numbering: choice `index` = prompt index x n + j. The engine request id is the response id for a
    single choice (so feedback refers to it as is), else `<id>-<index>`. With a seed, choice j draws with seed + j
    (vLLM does the same), so the choices differ and each is reproducible."""
    single = len(prompts) == 1 and n == 1
    out = []
    for p, (ids, text, params) in enumerate(prompts):
        for j in range(n):
            index = p * n + j
            child = params if j == 0 or params.seed is None else replace(params, seed=params.seed + j)
            rid = request_id if single else f"{request_id}-{index}"
            out.append(Choice(index, rid, p, ids, text, child))
    return out


def resolve_lora(settings: ApiSettings, model: str) -> str | None:
    """The base model is selected by its served name (or its path, like vLLM); anything else names an adapter."""
    if model == settings.served_model_name or (settings.model_path and model == settings.model_path):
        return None
    return model


def request_id_for(request: Request, prefix: str) -> str:
    """`X-Request-Id` when the client sets one (so feedback can refer to it), else a fresh `<prefix>-<hex>`."""
    given = request.headers.get("x-request-id")
    if given is None:
        return f"{prefix}-{uuid.uuid4().hex}"
    if not _REQUEST_ID.match(given):
        raise APIError(400, "X-Request-Id must be 1-128 characters of [A-Za-z0-9._:-]", param="X-Request-Id")
    return given


def max_model_len(runner: AsyncEngineRunner, settings: ApiSettings) -> int | None:
    if settings.max_model_len:
        return settings.max_model_len
    engine = runner.engine
    if engine is None:
        return None
    for source in (engine, getattr(engine, "config", None)):
        value = getattr(source, "max_model_len", None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(getattr(engine, "hf_config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) else None


def prompt_too_long(num_prompt_tokens: int, context: int) -> APIError:
    """vLLM's 400 for a prompt that leaves no room to generate in the model's context."""
    return APIError(
        400,
        f"This model's maximum context length is {context} tokens. However, your prompt has "
        f"{num_prompt_tokens} tokens. Please reduce the length of the prompt or messages.",
        param="prompt",
    )


def sampling_params(
    body: _SamplingFields,
    limit: int | None,
    num_prompt_tokens: int,
    context: int | None,
    eos_token_id: int | None,
    logprobs: int | None = None,
) -> Any:
    """Builds and validates the engine's SamplingParams; over-long prompts and bad values become 400."""
    from lorafleet.worker.engine.sequence import SamplingParams

    if num_prompt_tokens == 0:
        raise APIError(400, "the prompt is empty (0 tokens)", param="prompt")
    if context is not None:
        if num_prompt_tokens >= context:
            raise prompt_too_long(num_prompt_tokens, context)
        if limit is None:
            limit = context - num_prompt_tokens
        elif num_prompt_tokens + limit > context:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{num_prompt_tokens + limit} tokens ({num_prompt_tokens} in the prompt, {limit} in the completion). "
                "Please reduce the length of the prompt or completion.",
                param="max_tokens",
            )
    if limit is None:
        limit = 16
    top_k = body.top_k if body.top_k is not None else -1
    if top_k == 0:
        top_k = -1  # vLLM: 0 and -1 both mean "all tokens"
    params = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=top_k,
        seed=body.seed,
        max_tokens=limit,
        stop=body.stop_list(),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        incremental_text=bool(body.stream),  # a non-streaming response reads the final text only
        min_tokens=body.min_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output,
        logprobs=logprobs,
    )
    try:
        params.validate()
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc
    return params


def check_unsupported(body: _SamplingFields) -> None:
    bad = body.unsupported()
    if bad is not None:
        param, message = bad
        raise APIError(400, message, param=param)


def check_serving(runner: AsyncEngineRunner) -> None:
    try:
        runner.check_serving()
    except EngineNotReadyError as exc:
        raise APIError(503, str(exc), headers={"Retry-After": "5"}) from exc
    except EngineDeadError as exc:
        raise APIError(503, f"engine is not running: {exc}") from exc


async def admit(runner: AsyncEngineRunner, prep: Prepared, extra: dict[str, Any]) -> list[RequestStream]:
    """Admits every choice, in order; if one is refused, the ones admitted are aborted and the refusal answers."""
    streams: list[RequestStream] = []
    try:
        for choice in prep.choices:
            streams.append(await _admit_one(runner, prep, choice, extra))
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return streams


async def _admit_one(runner: AsyncEngineRunner, prep: Prepared, choice: Choice, extra: dict[str, Any]) -> RequestStream:
    try:
        return await runner.generate(choice.request_id, choice.prompt_token_ids, choice.params, prep.lora_name, extra)
    except OverloadedError as exc:
        raise APIError(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from exc
    except (EngineDeadError, EngineNotReadyError) as exc:
        check_serving(runner)
        raise APIError(503, f"engine is not running: {exc}") from exc
    except DuplicateRequestError as exc:
        raise APIError(400, str(exc), param="X-Request-Id") from exc
    except KeyError as exc:  # UnknownAdapterError
        raise APIError(404, f"The model `{prep.model}` does not exist.", param="model") from exc
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc


async def wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


async def collect(streams: list[RequestStream], request: Request) -> list[Any]:
    """Waits for every stream's final output; aborts them all at once (freeing their KV) if the client disconnects."""

    async def drain(stream: RequestStream) -> Any:
        last = None
        async for out in stream:
            last = out
        return last

    async def drain_all() -> list[Any]:
        return list(await asyncio.gather(*(drain(s) for s in streams)))

    work = asyncio.ensure_future(drain_all())
    gone = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.cancel()
        raise ClientGone()
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
        for stream in streams:
            stream.close()


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
    }


def now_s() -> int:
    return int(time.time())


def finish_reason(out: Any) -> str | None:
    reason = getattr(out, "finish_reason", None)
    return None if reason is None else str(reason)
