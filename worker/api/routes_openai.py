"""OpenAI `/v1/completions`, `/v1/chat/completions` (streaming SSE and not) and `/v1/models`, shaped like vLLM's.

`model` is the served base-model name or an adapter name; the response `id` is the engine request id (the client's
`X-Request-Id` when given, echoed in the `X-Request-Id` response header), which `/v1/feedback` refers to; with n > 1
or several prompts, choice `index` i is engine request `<id>-<i>`. Streaming is streaming.py; logprob objects are
logprobs.py.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from lorafleet.worker.api.auth import is_admin, require_api_key
from lorafleet.worker.api.errors import APIError
from lorafleet.worker.api.logprobs import TokenText, chat_logprobs, completion_logprobs
from lorafleet.worker.api.offload import Offload
from lorafleet.worker.api.protocol import ChatCompletionRequest, CompletionRequest
from lorafleet.worker.api.request_body import read_body
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
    plan_choices,
    prompt_too_long,
    request_id_for,
    resolve_lora,
    sampling_params,
    usage,
)
from lorafleet.worker.api.settings import ApiSettings
from lorafleet.worker.api.sse import EventStreamResponse
from lorafleet.worker.api.streaming import closer, stream_events
from lorafleet.worker.api.tokenization import (
    TooManyTokens,
    check_ids,
    decode,
    encode,
    render_chat,
    template_kwargs,
)
from lorafleet.worker.async_engine import AsyncEngineRunner, EngineDeadError

router = APIRouter(dependencies=[Depends(require_api_key)])

CLIENT_CLOSED = 499  # nginx's "client closed request"; nobody reads it, the access log does


def _state(request: Request) -> tuple[AsyncEngineRunner, ApiSettings]:
    return request.app.state.runner, request.app.state.settings


def _prepare(
    request: Request,
    body: CompletionRequest | ChatCompletionRequest,
    prompts: list[tuple[list[int], str | None]],
    prefix: str,
    num_logprobs: int | None,
) -> Prepared:
    runner, settings = _state(request)
    engine = runner.engine
    limit = body.max_tokens if isinstance(body, CompletionRequest) else body.limit()
    context = max_model_len(runner, settings)
    eos = getattr(getattr(engine, "tokenizer", None), "eos_token_id", None)
    planned = [(ids, text, sampling_params(body, limit, len(ids), context, eos, num_logprobs)) for ids, text in prompts]
    request_id = request_id_for(request, prefix)
    return Prepared(
        request_id=request_id,
        model=body.model,
        lora_name=resolve_lora(settings, body.model),
        choices=plan_choices(request_id, planned, body.n),
        created=now_s(),
        n=body.n,
    )


def _token_prompt(tokenizer: Any, prompt: list[int], echo: bool) -> tuple[list[int], str | None]:
    """A token-id prompt, checked against the vocabulary; its text only when `echo` shows it."""
    check_ids(prompt, len(tokenizer), "prompt")
    return list(prompt), decode(tokenizer, list(prompt)) if echo else None


async def _encode(offload: Offload, tokenizer: Any, text: str, add_special: bool, context: int | None) -> list[int]:
    """`text` tokenized in the offload pool; a prompt that fills the context is refused before its ids are built."""
    try:
        return await offload.run(
            encode, tokenizer, text, add_special, None if context is None else context - 1, cost=len(text)
        )
    except TooManyTokens as exc:
        assert context is not None
        raise prompt_too_long(exc.count, context) from exc


async def _tokenize_completion(
    tokenizer: Any, body: CompletionRequest, settings: ApiSettings, offload: Offload, context: int | None
) -> list[tuple[list[int], str | None]]:
    """(token ids, text) of every prompt, each tokenized (or checked) in the offload pool."""
    try:
        prompts = body.prompts()
    except ValueError as exc:
        raise APIError(400, str(exc), param="prompt") from exc
    if sum(len(p) for p in prompts if isinstance(p, str)) > settings.max_prompt_chars:
        raise APIError(400, f"prompt is longer than {settings.max_prompt_chars} characters", param="prompt")
    out: list[tuple[list[int], str | None]] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            out.append((await _encode(offload, tokenizer, prompt, True, context), prompt))
        else:
            out.append(await offload.run(_token_prompt, tokenizer, prompt, body.echo, cost=len(prompt)))
    return out


async def _tokenize_chat(
    tokenizer: Any, body: ChatCompletionRequest, settings: ApiSettings, offload: Offload, context: int | None
) -> tuple[list[int], list]:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    if sum(len(m["content"]) for m in messages) > settings.max_prompt_chars:
        raise APIError(400, f"messages are longer than {settings.max_prompt_chars} characters", param="messages")
    kwargs = template_kwargs(body.chat_template_kwargs)
    text = await offload.run(
        render_chat,
        tokenizer,
        messages,
        body.add_generation_prompt,
        kwargs,
        cost=sum(len(m["content"]) for m in messages),
        timeout_s=settings.chat_template_timeout_s,
        what="the chat template",
    )
    # The template already holds the special tokens (vLLM does the same: no second BOS).
    return await _encode(offload, tokenizer, text, False, context), messages


async def _respond(
    request: Request,
    body: CompletionRequest | ChatCompletionRequest,
    prompts: list[tuple[list[int], str | None]],
    kind: str,
    log_extra: dict[str, Any],
) -> Response:
    """Admission of every choice, then the SSE stream or the collected JSON; `kind` is "completion" or "chat" (the
    differences are the object names, how a choice carries its text and the shape of its logprobs)."""
    runner, _ = _state(request)
    chat = kind == "chat"
    num_logprobs = body.num_logprobs() if isinstance(body, ChatCompletionRequest) else body.logprobs
    echo = not chat and bool(getattr(body, "echo", False))
    prep = _prepare(request, body, prompts, "chatcmpl" if chat else "cmpl", num_logprobs)
    streams = await admit(runner, prep, log_extra)
    headers = {"X-Request-Id": prep.request_id}
    tokenizer = runner.engine.tokenizer
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = stream_events(streams, prep, include_usage, kind, tokenizer, num_logprobs, echo)
        return EventStreamResponse(events, closer(streams), headers)
    try:
        outs = await collect(streams, request)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    except EngineDeadError as exc:
        raise APIError(503, f"engine is not running: {exc}") from exc
    text_of = TokenText(tokenizer)
    choices = []
    for choice, out in zip(prep.choices, outs, strict=True):
        logprobs = None
        if num_logprobs is not None:
            entries = out.logprobs or []
            if chat:
                logprobs = chat_logprobs(entries, text_of, num_logprobs)
            else:
                logprobs = completion_logprobs(entries, text_of, num_logprobs)
        if chat:
            item: dict[str, Any] = {"index": choice.index, "message": {"role": "assistant", "content": out.text}}
        else:
            text = (choice.prompt_text or "") + out.text if echo else out.text
            item = {"index": choice.index, "text": text}
        choices.append(
            {**item, "logprobs": logprobs, "finish_reason": finish_reason(out), "stop_reason": out.stop_reason}
        )
    payload = {
        "id": prep.request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": prep.created,
        "model": prep.model,
        "choices": choices,
        "usage": usage(prep.num_prompt_tokens, sum(len(out.output_token_ids) for out in outs)),
    }
    return JSONResponse(payload, headers=headers)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    body = await read_body(request, CompletionRequest)
    runner, settings = _state(request)
    check_unsupported(body)
    check_serving(runner)
    context = max_model_len(runner, settings)
    prompts = await _tokenize_completion(runner.engine.tokenizer, body, settings, request.app.state.offload, context)
    texts = [text for _, text in prompts]
    extra = {"prompt": texts[0] if len(texts) == 1 else texts, "endpoint": "completions"}
    return await _respond(request, body, prompts, "completion", extra)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    body = await read_body(request, ChatCompletionRequest)
    runner, settings = _state(request)
    check_unsupported(body)
    check_serving(runner)
    context = max_model_len(runner, settings)
    offload = request.app.state.offload
    prompt_ids, messages = await _tokenize_chat(runner.engine.tokenizer, body, settings, offload, context)
    return await _respond(request, body, [(prompt_ids, None)], "chat", {"messages": messages, "endpoint": "chat"})


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
