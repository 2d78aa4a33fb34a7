"""vLLM's `/tokenize` and `/detokenize`: the served model's tokenizer over HTTP (same shapes as vLLM).

Why here: clients count tokens before sending (context budgeting) and render chat prompts to check a template;
they must see exactly what the engine would see. The work, the JSON of the answer included, runs in the
offload pool, off the event loop.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from lorafleet.worker.api.auth import require_api_key
from lorafleet.worker.api.errors import APIError
from lorafleet.worker.api.offload import Offload
from lorafleet.worker.api.protocol import DetokenizeRequest, TokenizeRequest
from lorafleet.worker.api.request_body import read_body
from lorafleet.worker.api.serving import check_serving, max_model_len, resolve_lora
from lorafleet.worker.api.settings import ApiSettings
from lorafleet.worker.api.tokenization import detokenize_answer, render_chat, template_kwargs, tokenize_answer

router = APIRouter(dependencies=[Depends(require_api_key)])


async def _check_model(request: Request, model: str | None) -> None:
    """A named model must be the base or a loaded adapter (they share the base's tokenizer)."""
    settings: ApiSettings = request.app.state.settings
    if model is None or resolve_lora(settings, model) is None:
        return
    names = {a.name for a in (await request.app.state.runner.fresh_snapshot()).adapters}
    if model not in names:
        raise APIError(404, f"The model `{model}` does not exist.", param="model")


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    body = await read_body(request, TokenizeRequest)
    runner = request.app.state.runner
    settings: ApiSettings = request.app.state.settings
    offload: Offload = request.app.state.offload
    check_serving(runner)
    await _check_model(request, body.model)
    tok = runner.engine.tokenizer
    if body.messages is not None:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if sum(len(m["content"]) for m in messages) > settings.max_prompt_chars:
            raise APIError(400, f"messages are longer than {settings.max_prompt_chars} characters", param="messages")
        text = await offload.run(
            render_chat,
            tok,
            messages,
            body.add_generation_prompt,
            template_kwargs(body.chat_template_kwargs),
            cost=sum(len(m["content"]) for m in messages),
            timeout_s=settings.chat_template_timeout_s,
            what="the chat template",
        )
        add_special = bool(body.add_special_tokens) if body.add_special_tokens is not None else False
    else:
        text = body.prompt or ""
        if len(text) > settings.max_prompt_chars:
            raise APIError(400, f"prompt is longer than {settings.max_prompt_chars} characters", param="prompt")
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
    context = max_model_len(runner, settings)
    answer = await offload.run(
        tokenize_answer,
        tok,
        text,
        add_special,
        body.return_token_strs,
        context,
        settings.max_tokenize_tokens,
        cost=len(text),
    )
    return Response(answer, media_type="application/json")


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    body = await read_body(request, DetokenizeRequest)
    runner = request.app.state.runner
    check_serving(runner)
    await _check_model(request, body.model)
    offload: Offload = request.app.state.offload
    answer = await offload.run(detokenize_answer, runner.engine.tokenizer, body.tokens, cost=len(body.tokens))
    return Response(answer, media_type="application/json")
