"""One request as a handler sees it: the errors admission raises and the async stream of its outputs.

Why apart from the runner: handlers import these (to map errors to HTTP statuses and to iterate outputs) without
anything of the engine thread's machinery; the runner fills a stream's queue from the engine thread.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorafleet.worker.async_engine import AsyncEngineRunner


class EngineDeadError(RuntimeError):
    """The engine thread is not running (failed to start, crashed or stopped)."""


class EngineNotReadyError(RuntimeError):
    """The model is still loading."""


class OverloadedError(RuntimeError):
    """Too many requests are waiting; the client should retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DuplicateRequestError(ValueError):
    """A request with this id is already in flight."""


@dataclass
class _Tracked:
    request_id: str
    lora_name: str | None
    prompt_token_ids: list[int]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    extra: dict[str, Any]
    first_token_at: float | None = None
    last_token_at: float | None = None
    last_output: Any = None


class RequestStream:
    """Async iterator over one request's `RequestOutput`s; `close()` aborts the request unless it finished.

    Handlers must call `close()` in a `finally` (client disconnects cancel the handler): that is what frees the
    request's KV blocks at once.
    """

    def __init__(self, runner: AsyncEngineRunner, tracked: _Tracked) -> None:
        self._runner = runner
        self._tracked = tracked
        self.finished = False
        self.closed = False

    @property
    def request_id(self) -> str:
        return self._tracked.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Any:
        if self.finished or self.closed:
            raise StopAsyncIteration
        item = await self._tracked.queue.get()
        if isinstance(item, BaseException):
            self.closed = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def close(self) -> None:
        if not self.finished and not self.closed:
            self._runner.abort(self.request_id)
        self.closed = True
