"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status as `code`.

Why these `type` names: they are the exception class names of the `openai` Python SDK, which is also what vLLM's
server puts there (BadRequestError, NotFoundError, ...), so clients written for vLLM can switch on them unchanged.
Validation failures are 400, not FastAPI's 422, because OpenAI and vLLM answer malformed bodies with 400.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """Raised by handlers; rendered by `api_error_handler` in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        err_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.err_type = err_type or ERROR_TYPES.get(status, "APIError")
        self.headers = headers


def error_body(status: int, message: str, err_type: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": err_type or ERROR_TYPES.get(status, "APIError"),
            "param": param,
            "code": status,
        }
    }


def error_response(
    status: int,
    message: str,
    *,
    err_type: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, err_type, param), status_code=status, headers=headers)


async def internal_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """Any exception no handler mapped: a JSON 500 (never the plain-text page), without the exception's text."""
    return error_response(500, f"internal error ({type(exc).__name__}); the worker log has the details")


async def api_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc.status, exc.message, err_type=exc.err_type, param=exc.param, headers=exc.headers)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    parts = []
    param = None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        if param is None and loc:
            param = loc[0]
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request", param


def _foreign(request: Request, own_paths: frozenset[str]) -> bool:
    """True for a matched route that another module added (e.g. the training router keeps FastAPI's shapes)."""
    route = request.scope.get("route")
    return route is not None and getattr(route, "path", None) not in own_paths


def make_handlers(own_paths: frozenset[str]):
    """Exception handlers: OpenAI shape (validation = 400) for our routes and unmatched paths, FastAPI's otherwise."""

    async def validation_handler(request: Request, exc: Exception):
        assert isinstance(exc, RequestValidationError)
        if _foreign(request, own_paths):
            return await request_validation_exception_handler(request, exc)
        message, param = _describe_validation(exc)
        return JSONResponse(jsonable_encoder(error_body(400, message, param=param)), status_code=400)

    async def http_handler(request: Request, exc: Exception):
        assert isinstance(exc, StarletteHTTPException)
        if _foreign(request, own_paths):
            return await http_exception_handler(request, exc)
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    return validation_handler, http_handler
