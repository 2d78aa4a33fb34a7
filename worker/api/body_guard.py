"""ASGI middleware that admits a request body only if it is bounded, strict JSON the handlers can live with.

Why in front of every route: FastAPI's parser accepts what JSON allows Python to build but the worker cannot serve,
and past the parser each of those ends as a plain-text 500 that closes the keep-alive connection: a lone surrogate
(`"\\ud800"`) that no tokenizer or JSON encoder takes, `NaN` and `1e999` (infinity) in numbers, nesting deep enough to
exhaust the recursion limit, integers of thousands of digits, and bodies of any size. Here each is a 4xx in the
OpenAI error shape, after the whole body was read, so the connection stays usable; larger bodies are refused
(413) from `Content-Length` before they are read, or as soon as a chunked body passes the limit.
Each body is parsed here once: the parsed value rides in the ASGI scope (`PARSED`) and the OpenAI routes validate
it from there (`request_body.read_body`) instead of parsing the bytes a second time. Big bodies are parsed in the
offload pool (`offload.py`) so the check never holds the event loop; when that pool is full the answer is 429.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

from lorafleet.worker.api.errors import error_body
from lorafleet.worker.api.offload import Busy, Offload

MAX_DEPTH = 64  # the deepest real body (chat content parts, job specs) nests 5 levels
MAX_INT_DIGITS = 64
THREAD_PARSE_BYTES = 64 << 10  # bodies above this are parsed (and validated) in the offload pool
PARSED = "lorafleet.body"  # scope key: the parsed JSON value of the body (absent for an empty body)
BODY_SIZE = "lorafleet.body_size"  # scope key: the body's length in bytes
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


def parse_json(raw: bytes) -> Any:
    """The value of `raw`; raises BodyRejected unless it is strict JSON: UTF-8, finite numbers of sane size, no lone
    surrogates, nested at most MAX_DEPTH deep."""
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
    return data


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
    """Wraps an ASGI app; `max_bytes` bounds every request body (413 above it), `path_limits` some paths' lower;
    `offload` parses the big ones."""

    def __init__(
        self, app: Callable, max_bytes: int, offload: Offload, path_limits: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.offload = offload
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
        scope[BODY_SIZE] = len(raw)
        if raw.strip():
            try:
                scope[PARSED] = await self._parse(raw)
            except BodyRejected as exc:
                await _error(send, exc.status, exc.message, retry_after=exc.status == 429)
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _parse(self, raw: bytes) -> Any:
        if len(raw) <= THREAD_PARSE_BYTES:
            return parse_json(raw)
        try:
            future = self.offload.submit(parse_json, raw, cost=len(raw))
        except Busy as exc:
            raise BodyRejected(429, f"the worker is busy: {exc}; retry later") from exc
        return await asyncio.wrap_future(future)


def _content_length(scope: dict) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _error(send: Send, status: int, message: str, close: bool = False, retry_after: bool = False) -> None:
    body = json.dumps(error_body(status, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after:
        headers.append((b"retry-after", b"1"))
    if close:  # the unread rest of the body would be taken for the next request: end the connection instead
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
