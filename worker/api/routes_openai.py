"""OpenAI `/v1/completions`, `/v1/chat/completions` (streaming SSE and not) and `/v1/models`, shaped like vLLM's.

`model` is the served base-model name or an adapter name; the response `id` is the engine request id (the client's
`X-Request-Id` when given, echoed in the `X-Request-Id` response header), which `/v1/feedback` refers to.
Streaming text is sent as deltas of the engine's cumulative detokenised text, so the concatenation of the chunks
equals the non-streaming text for the same greedy request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from lorafleet.worker.api.auth import is_admin, require_api_key
from lorafleet.worker.api.errors import APIError, error_body
from lorafleet.worker.api.protocol import ChatCompletionRequest, CompletionRequest
from lorafleet.worker.api.serving import (
    ClientGone,
    Prepared,
    admit,
    check_serving,
    check_unsupported,
    collect,
    finish_reason,
    max_model_len,
    now_s,
    request_id_for,
    resolve_lora,
    sampling_params,
    usage,
)
from lorafleet.worker.api.settings import ApiSettings
from lorafleet.worker.api.sse import SSE_DONE, EventStreamResponse, sse
from lorafleet.worker.api.tokenization import encode, off_loop, render_chat, template_kwargs
from lorafleet.worker.async_engine import AsyncEngineRunner, EngineDeadError, RequestStream

router = APIRouter(dependencies=[Depends(require_api_key)])

CLIENT_CLOSED = 499  # nginx's "client closed request"; nobody reads it, the access log does


def _state(request: Request) -> tuple[AsyncEngineRunner, ApiSettings]:
    return request.app.state.runner, request.app.state.settings


def _prepare(
    request: Request, body: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int], prefix: str
) -> Prepared:
    runner, settings = _state(request)
    engine = runner.engine
    limit = body.max_tokens if isinstance(body, CompletionRequest) else body.limit()
    params = sampling_params(
        body,
        limit,
        len(prompt_ids),
        max_model_len(runner, settings),
        getattr(getattr(engine, "tokenizer", None), "eos_token_id", None),
    )
    return Prepared(
        request_id=request_id_for(request, prefix),
        model=body.model,
        lora_name=resolve_lora(settings, body.model),
        prompt_token_ids=prompt_ids,
        params=params,
        created=now_s(),
    )


async def _tokenize_completion(
    tokenizer: Any, body: CompletionRequest, settings: ApiSettings
) -> tuple[list[int], str | None]:
    try:
        prompt = body.single_prompt()
    except ValueError as exc:
        raise APIError(400, str(exc), param="prompt") from exc
    if isinstance(prompt, str):
        if len(prompt) > settings.max_prompt_chars:
            raise APIError(400, f"prompt is longer than {settings.max_prompt_chars} characters", param="prompt")
        return await off_loop(encode, tokenizer, prompt, what="tokenization"), prompt
    vocab = len(tokenizer)
    if any(t < 0 or t >= vocab for t in prompt):
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    return list(prompt), None


async def _tokenize_chat(tokenizer: Any, body: ChatCompletionRequest, settings: ApiSettings) -> tuple[list[int], list]:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    if sum(len(m["content"]) for m in messages) > settings.max_prompt_chars:
        raise APIError(400, f"messages are longer than {settings.max_prompt_chars} characters", param="messages")
    kwargs = template_kwargs(body.chat_template_kwargs)
    text = await off_loop(
        render_chat,
        tokenizer,
        messages,
        body.add_generation_prompt,
        kwargs,
        timeout_s=settings.chat_template_timeout_s,
        what="the chat template",
    )
    # The template already holds the special tokens (vLLM does the same: no second BOS).
    return await off_loop(encode, tokenizer, text, False, what="tokenization"), messages


async def _respond(
    request: Request,
    body: CompletionRequest | ChatCompletionRequest,
    prompt_ids: list[int],
    kind: str,
    log_extra: dict[str, Any],
) -> Response:
    """Admission, then the SSE stream or the collected JSON; `kind` is "completion" or "chat" (the only
    differences are the object names and how a choice carries its text)."""
    runner, _ = _state(request)
    prep = _prepare(request, body, prompt_ids, "cmpl" if kind == "completion" else "chatcmpl")
    stream = await admit(runner, prep, log_extra)
    headers = {"X-Request-Id": prep.request_id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStreamResponse(_stream_events(stream, prep, include_usage, kind), stream.close, headers)
    try:
        out = await collect(stream, request)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    except EngineDeadError as exc:
        raise APIError(503, f"engine is not running: {exc}") from exc
    if kind == "completion":
        choice = {"index": 0, "text": out.text, "logprobs": None}
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": None}
    payload = {
        "id": prep.request_id,
        "object": "text_completion" if kind == "completion" else "chat.completion",
        "created": prep.created,
        "model": prep.model,
        "choices": [{**choice, "finish_reason": finish_reason(out), "stop_reason": None}],
        "usage": usage(len(prompt_ids), len(out.output_token_ids)),
    }
    return JSONResponse(payload, headers=headers)


@router.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest) -> Response:
    runner, settings = _state(request)
    check_unsupported(body)
    check_serving(runner)
    prompt_ids, prompt_text = await _tokenize_completion(runner.engine.tokenizer, body, settings)
    return await _respond(request, body, prompt_ids, "completion", {"prompt": prompt_text, "endpoint": "completions"})


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    runner, settings = _state(request)
    check_unsupported(body)
    check_serving(runner)
    prompt_ids, messages = await _tokenize_chat(runner.engine.tokenizer, body, settings)
    return await _respond(request, body, prompt_ids, "chat", {"messages": messages, "endpoint": "chat"})


async def _events(stream: RequestStream, holdback: int) -> AsyncIterator[tuple[Any, str]]:
    """(output, text delta) pairs; the delta is the new suffix of the engine's cumulative text.

    With stop strings, the last `holdback` (= longest stop string - 1) characters are held back until the request
    finishes: the engine cuts the text before a stop string once it is complete, and a partial match must never
    have been sent (vLLM does the same).
    """
    sent = ""
    async for out in stream:
        text = out.text or ""
        visible = text if out.finished or holdback <= 0 else text[: max(0, len(text) - holdback)]
        delta = visible[len(sent) :] if visible.startswith(sent) and len(visible) > len(sent) else ""
        sent += delta
        yield out, delta


async def _stream_events(stream: RequestStream, prep: Prepared, include_usage: bool, kind: str) -> AsyncIterator[str]:
    """SSE chunks: a completion chunk carries `text`; a chat chunk a `delta` (after a first role-only chunk)."""
    chat = kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"
    base = {"id": prep.request_id, "object": obj, "created": prep.created, "model": prep.model}
    if chat:
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield sse({**base, "choices": [first]})
    completion_tokens = 0
    try:
        async for out, delta in _events(stream, prep.holdback):
            completion_tokens = len(out.output_token_ids)
            reason = finish_reason(out) if out.finished else None
            if not delta and reason is None:
                continue
            if chat:
                choice = {"index": 0, "delta": {"content": delta} if delta else {}, "logprobs": None}
                choice["finish_reason"] = reason
            else:
                choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": reason, "stop_reason": None}
            yield sse({**base, "choices": [choice]})
    except EngineDeadError as exc:
        yield sse(error_body(503, f"engine is not running: {exc}"))
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(len(prep.prompt_token_ids), completion_tokens)})
    yield SSE_DONE


async def _model_cards(request: Request) -> list[dict[str, Any]]:
    """The base model and every loaded adapter; `root` is a host path for admin callers only (anyone else sees
    the model's id there: where weights live on disk is nobody else's business)."""
    runner, settings = _state(request)
    admin = is_admin(request)
    created = now_s()
    context = max_model_len(runner, settings)
    base_root = (settings.model_path or settings.served_model_name) if admin else settings.served_model_name
    data: list[dict[str, Any]] = [
        {
            "id": settings.served_model_name,
            "object": "model",
            "created": created,
            "owned_by": "lorafleet",
            "root": base_root,
            "parent": None,
            "max_model_len": context,
        }
    ]
    for info in (await runner.fresh_snapshot()).adapters:
        data.append(
            {
                "id": info.name,
                "object": "model",
                "created": created,
                "owned_by": "lorafleet",
                "root": info.path if admin else info.name,
                "parent": settings.served_model_name,
                "max_model_len": context,
            }
        )
    return data


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": await _model_cards(request)})


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str) -> JSONResponse:
    for card in await _model_cards(request):
        if card["id"] == model_id:
            return JSONResponse(card)
    raise APIError(404, f"The model `{model_id}` does not exist.", param="model")
