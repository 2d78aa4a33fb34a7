"""ASGI middleware that admits a request body only if it is bounded, strict JSON the handlers can live with.

Why in front of every route: FastAPI's parser accepts what JSON allows Python to build but the worker cannot serve,
and each of those used to end as a plain-text 500 that closed the keep-alive connection: a lone surrogate
(`"\\ud800"`) that no tokenizer or JSON encoder takes, `NaN` and `1e999` (infinity) in numbers, nesting deep enough to
exhaust the recursion limit, integers of thousands of digits, and bodies of any size. Here each is a 4xx in the
OpenAI error shape, after the whole body was read, so the connection stays usable; larger bodies are refused
(413) from `Content-Length` before they are read, or as soon as a chunked body passes the limit.
Big bodies are parsed in a worker thread so the check itself never holds the event loop.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

from lorafleet.worker.api.errors import error_body

MAX_DEPTH = 64  # the deepest real body (chat content parts, job specs) nests 5 levels
MAX_INT_DIGITS = 64
THREAD_PARSE_BYTES = 64 << 10
_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class BodyRejected(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _reject_constant(name: str) -> Any:
    raise BodyRejected(400, f"body is not valid JSON: {name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BodyRejected(400, "body is not valid JSON: a number is out of range")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BodyRejected(400, f"body is not valid JSON: an integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def check_json(raw: bytes) -> None:
    """Raises BodyRejected unless `raw` is strict JSON: UTF-8, finite numbers of sane size, no lone surrogates,
    nested at most MAX_DEPTH deep."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant, parse_float=_float, parse_int=_int)
    except BodyRejected:
        raise
    except RecursionError as exc:
        raise BodyRejected(400, f"body is nested deeper than {MAX_DEPTH} levels") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise BodyRejected(400, f"body is not valid JSON: {_short(exc)}") from exc
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth > MAX_DEPTH:
            raise BodyRejected(400, f"body is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key)
                stack.append((item, depth + 1))
        else:
            stack.extend((item, depth + 1) for item in value)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BodyRejected(400, "body is not valid JSON: a string holds a lone UTF-16 surrogate") from exc


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:197] + "..."


Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class BodyGuard:
    """Wraps an ASGI app; `max_bytes` bounds every request body (413 above it), `path_limits` some paths' lower."""

    def __init__(self, app: Callable, max_bytes: int, path_limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = dict(path_limits or {})

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _METHODS:
            await self.app(scope, receive, send)
            return
        limit = min(self.max_bytes, self.path_limits.get(scope.get("path", ""), self.max_bytes))
        length = _content_length(scope)
        if length is not None and length > limit:
            await _error(send, 413, f"body is larger than {limit} bytes", close=True)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _error(send, 413, f"body is larger than {limit} bytes", close=True)
                return
            chunks.append(chunk)
            more = bool(message.get("more_body"))
        raw = b"".join(chunks)
        if raw.strip():
            try:
                if len(raw) > THREAD_PARSE_BYTES:
                    await asyncio.to_thread(check_json, raw)
                else:
                    check_json(raw)
            except BodyRejected as exc:
                await _error(send, exc.status, exc.message)
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


def _content_length(scope: dict) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _error(send: Send, status: int, message: str, close: bool = False) -> None:
    body = json.dumps(error_body(status, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # the unread rest of the body would be taken for the next request: end the connection instead
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
