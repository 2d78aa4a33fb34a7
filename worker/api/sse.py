"""Server-sent events whose producer is stopped the moment the client disconnects.

Why not Starlette's `StreamingResponse`: depending on the server's ASGI spec version it notices a disconnect only
on the next write, which for a slow generation can be seconds later, and it leaves the body iterator to the garbage
collector. Here a listener waits for `http.disconnect` next to the writer; whichever ends first stops the other, and
`on_close` (which aborts the engine request and frees its KV blocks) always runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(
        self, events: AsyncIterator[str], on_close: Callable[[], None], headers: dict[str, str] | None = None
    ) -> None:
        # Not Response.__init__: it would render an empty body and declare Content-Length: 0.
        self.status_code = 200
        self.background = None
        self.init_headers(headers)
        self.events = events
        self.on_close = on_close
        self.raw_headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def listen() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return

        writer = asyncio.ensure_future(pump())
        listener = asyncio.ensure_future(listen())
        try:
            done, _ = await asyncio.wait({writer, listener}, return_when=asyncio.FIRST_COMPLETED)
            if writer in done:
                exc = writer.exception()
                if exc is not None and not isinstance(exc, OSError):
                    raise exc
        finally:
            for task in (writer, listener):
                if not task.done():
                    task.cancel()
            for task in (writer, listener):
                with contextlib.suppress(BaseException):
                    await task
            try:
                self.on_close()
            finally:
                aclose = getattr(self.events, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()
