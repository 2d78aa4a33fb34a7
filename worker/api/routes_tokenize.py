"""vLLM's `/tokenize` and `/detokenize`: the served model's tokenizer over HTTP (same shapes as vLLM).

Why here: clients count tokens before sending (context budgeting) and render chat prompts to check a template;
they must see exactly what the engine would see. The work runs in the tokenizer pool, off the event loop.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from lorafleet.worker.api.auth import require_api_key
from lorafleet.worker.api.errors import APIError
from lorafleet.worker.api.protocol import DetokenizeRequest, TokenizeRequest
from lorafleet.worker.api.serving import check_serving, max_model_len, resolve_lora
from lorafleet.worker.api.settings import ApiSettings
from lorafleet.worker.api.tokenization import decode, encode, off_loop, render_chat, template_kwargs

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
async def tokenize(request: Request, body: TokenizeRequest) -> JSONResponse:
    runner = request.app.state.runner
    settings: ApiSettings = request.app.state.settings
    check_serving(runner)
    await _check_model(request, body.model)
    tok = runner.engine.tokenizer
    if body.messages is not None:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if sum(len(m["content"]) for m in messages) > settings.max_prompt_chars:
            raise APIError(400, f"messages are longer than {settings.max_prompt_chars} characters", param="messages")
        text = await off_loop(
            render_chat,
            tok,
            messages,
            body.add_generation_prompt,
            template_kwargs(body.chat_template_kwargs),
            timeout_s=settings.chat_template_timeout_s,
            what="the chat template",
        )
        add_special = bool(body.add_special_tokens) if body.add_special_tokens is not None else False
    else:
        text = body.prompt or ""
        if len(text) > settings.max_prompt_chars:
            raise APIError(400, f"prompt is longer than {settings.max_prompt_chars} characters", param="prompt")
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
    ids = await off_loop(encode, tok, text, add_special, what="tokenization")
    out: dict[str, Any] = {"count": len(ids), "max_model_len": max_model_len(runner, settings), "tokens": ids}
    out["token_strs"] = tok.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return JSONResponse(out)


@router.post("/detokenize")
async def detokenize(request: Request, body: DetokenizeRequest) -> JSONResponse:
    runner = request.app.state.runner
    check_serving(runner)
    await _check_model(request, body.model)
    tok = runner.engine.tokenizer
    vocab = len(tok)
    if any(t < 0 or t >= vocab for t in body.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
    return JSONResponse({"prompt": await off_loop(decode, tok, list(body.tokens), what="detokenization")})
