"""The request body of an OpenAI route as its pydantic model, from the value `BodyGuard` parsed (never re-parsed).

Why not FastAPI's body parameters: FastAPI reads and `json.loads` the bytes again on the event loop and validates
there, so a 1 MiB body was parsed twice and validated on the loop. Here validation uses the guard's parsed value,
in the offload pool for big bodies; a validation error is FastAPI's `RequestValidationError`, so it answers the
same OpenAI-shaped 400 as before (errors.py).
"""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from lorafleet.worker.api.body_guard import BODY_SIZE, PARSED, THREAD_PARSE_BYTES
from lorafleet.worker.api.offload import Offload
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: object) -> M:
    """`data` as `model`; a RequestValidationError (a 400 in the OpenAI shape) when it does not fit."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from exc


async def read_body(request: Request, model: type[M]) -> M:
    """The body as `model`: the guard's parsed value (None for an empty body, which fails validation)."""
    data = request.scope.get(PARSED)
    size = request.scope.get(BODY_SIZE, 0)
    if size <= THREAD_PARSE_BYTES:
        return validate(model, data)
    offload: Offload = request.app.state.offload
    return await offload.run(validate, model, data, cost=size)
