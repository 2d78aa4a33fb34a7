"""Runs the synchronous `LLMEngine` in ONE background thread and bridges it to asyncio request handlers.

Why one thread that owns the engine: `LLMEngine` (scheduler, block manager, adapter store, CUDA streams) is not
thread-safe, and every mutation must happen *between* iterations so that a step never sees a half-added request
or a half-unloaded adapter. Handlers therefore never touch the engine: they put commands (add / abort / call) on a
queue that the engine thread drains before each `step()`, and they receive outputs on a per-request
`asyncio.Queue` filled with `loop.call_soon_threadsafe`. Admin operations (load/unload adapter, training control)
are plain callables run in the engine thread between iterations (`await runner.call(fn)`).

The engine is built inside the thread (`engine_factory`), so the HTTP server answers `/health` while the model
loads and `/ready` turns 200 when it is loaded. If the factory or a step raises, the runner is dead: every waiting
request gets `EngineDeadError` (HTTP 503) instead of hanging.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from lorafleet.worker.engine.plugin import FinishedRequest, IterationPlugin
from lorafleet.worker.engine_snapshot import EngineSnapshot, publish_snapshot, read_snapshot
from lorafleet.worker.metrics import WorkerMetrics
from lorafleet.worker.request_stream import (
    DuplicateRequestError,
    EngineDeadError,
    EngineNotReadyError,
    OverloadedError,
    RequestStream,
    _Tracked,
)

log = logging.getLogger(__name__)
__all__ = [
    "AsyncEngineRunner",
    "DuplicateRequestError",
    "EngineDeadError",
    "EngineNotReadyError",
    "OverloadedError",
    "RequestStream",
]


class AsyncEngineRunner:
    """Owns the engine thread; see the module docstring."""

    def __init__(
        self,
        engine_factory: Callable[[], Any],
        *,
        metrics: WorkerMetrics | None = None,
        max_waiting: int = 0,
        retry_after_s: int = 1,
        snapshot_interval_s: float = 0.2,
        idle_wait_s: float = 0.05,
    ) -> None:
        self._factory = engine_factory
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self.snapshot_interval_s = snapshot_interval_s
        self.idle_wait_s = idle_wait_s
        self._plugins: list[IterationPlugin] = []
        self._engine: Any = None
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self._pending_adds = 0
        self._num_waiting = 0
        self._snapshot = EngineSnapshot()
        self._last_snapshot = 0.0

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def add_plugin(self, plugin: IterationPlugin) -> None:
        """Registers work that rides the serving loop (engine/plugin.py). Before `start()` it is attached as soon as
        the engine is built, before the worker reports ready; later, between two iterations."""
        self._plugins.append(plugin)
        if self._engine is not None:
            self.call_threadsafe(lambda engine: engine.add_plugin(plugin))

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("runner already started")
        self._thread = threading.Thread(target=self._main, name="lorafleet-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Blocks until the model is loaded (True) or the engine died / the timeout passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self._error is not None or (deadline is not None and time.monotonic() > deadline):
                return False
        return self._error is None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.alive

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def engine(self) -> Any:
        """The engine object, for reading immutable things (tokenizer, config); mutate it only via `call`."""
        return self._engine

    @property
    def snapshot(self) -> EngineSnapshot:
        """The last published state (at most `snapshot_interval_s` old while requests run)."""
        return self._snapshot

    async def fresh_snapshot(self) -> EngineSnapshot:
        """The state as of now, read between iterations (what a client that just got a response expects to see);
        the last published one if the engine is not running."""
        if not self.ready:
            return self._snapshot

        def take(engine: Any) -> EngineSnapshot:
            self._refresh(force=True)
            return self._snapshot

        try:
            return await self.call(take)
        except EngineDeadError:
            return self._snapshot

    # -- called from the event loop -----------------------------------------------------------------------------
    def check_serving(self) -> None:
        if not self.alive:
            raise EngineDeadError(self._error or "engine thread is not running")
        if not self._ready.is_set():
            raise EngineNotReadyError("model is still loading")

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: Any,
        lora_name: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> RequestStream:
        """Admits a request between iterations; raises what `add_request` raises (ValueError, KeyError, ...)."""
        self.check_serving()
        with self._lock:
            if self.max_waiting > 0 and self._num_waiting + self._pending_adds >= self.max_waiting:
                raise OverloadedError(
                    f"too many requests waiting ({self._num_waiting + self._pending_adds} >= {self.max_waiting})",
                    self.retry_after_s,
                )
            self._pending_adds += 1
        tracked = _Tracked(
            request_id=request_id,
            lora_name=lora_name,
            prompt_token_ids=list(prompt_token_ids),
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
            arrival=time.monotonic(),
            extra=extra or {},
        )
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(("add", tracked, params, fut))
        try:
            await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return RequestStream(self, tracked)

    def abort(self, request_id: str) -> None:
        """Thread-safe; the engine thread frees the request's KV blocks before its next step."""
        self._submit(("abort", request_id, None, None))

    async def call(self, fn: Callable[[Any], Any], *, publish: bool = False) -> Any:
        """Runs `fn(engine)` in the engine thread between iterations and returns its result (or raises).

        `publish=True` republishes the snapshot and metrics right after (admin changes such as adapter loads);
        otherwise they follow within `snapshot_interval_s` (training slices call in a tight loop).
        """
        return await asyncio.wrap_future(self.call_threadsafe(fn, publish=publish))

    def call_threadsafe(self, fn: Callable[[Any], Any], *, publish: bool = False) -> concurrent.futures.Future:
        if not self.alive:
            raise EngineDeadError(self._error or "engine thread is not running")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(("call", fn, publish, fut))
        return fut

    def _submit(self, cmd: tuple) -> None:
        self._cmds.put(cmd)
        self._wake.set()
        if self._error is not None:
            # The thread is gone; nobody will drain this command.
            self._fail_commands()

    # -- the engine thread --------------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            engine = self._factory()
        except BaseException as exc:  # noqa: BLE001 - any failure to build the engine makes the worker unready
            log.exception("engine failed to start")
            self._die(f"engine failed to start: {exc!r}")
            return
        self._engine = engine
        for plugin in list(self._plugins):
            try:
                engine.add_plugin(plugin)
            except Exception:  # noqa: BLE001 - a plugin must never take serving down
                log.exception("plugin %r failed to attach", plugin)
        from lorafleet.worker.gpu import prioritise_serving_stream

        prioritise_serving_stream(
            getattr(engine, "device", None)
        )  # serving goes first; co-serving training fills the gaps
        self._ready.set()
        log.info("engine ready")
        try:
            self._refresh(force=True)
            while not self._stopping.is_set():
                if self._drain():
                    self._refresh_counts()
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    self._refresh_counts()  # before delivery: a client that saw its token sees the new counts
                    self._dispatch(outputs)
                    # Going idle: publish the final state now, not one interval later.
                    self._refresh(force=not engine.has_unfinished_requests())
                else:
                    self._refresh(force=False)
                    self._wake.wait(self.idle_wait_s)
                    self._wake.clear()
        except BaseException as exc:  # noqa: BLE001 - the worker must report, not hang
            log.exception("engine thread died")
            self._die(f"engine step failed: {exc!r}")
            return
        self._die("engine stopped")

    def _drain(self) -> bool:
        """Applies queued commands; returns whether any request was added or aborted."""
        changed = False
        while True:
            try:
                kind, a, b, fut = self._cmds.get_nowait()
            except queue.Empty:
                return changed
            if kind == "add":
                changed = True
                self._do_add(a, b, fut)
            elif kind == "abort":
                changed = True
                self._do_abort(a)
            elif kind == "call":
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    fut.set_result(a(self._engine))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(exc)
                self._refresh(force=bool(b))

    def _do_add(self, tracked: _Tracked, params: Any, fut: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending_adds -= 1
        if not fut.set_running_or_notify_cancel():
            return
        if tracked.request_id in self._tracked:
            fut.set_exception(DuplicateRequestError(f"request id {tracked.request_id!r} is already in flight"))
            return
        try:
            self._engine.add_request(tracked.request_id, tracked.prompt_token_ids, params, lora_name=tracked.lora_name)
        except BaseException as exc:  # noqa: BLE001 - ValueError / UnknownAdapterError go back to the handler
            fut.set_exception(exc)
            return
        self._tracked[tracked.request_id] = tracked
        if self.metrics is not None:
            self.metrics.on_admitted(tracked.lora_name)
        fut.set_result(None)

    def _do_abort(self, request_id: str) -> None:
        t = self._tracked.pop(request_id, None)
        if t is None:
            return
        try:
            self._engine.abort_request(request_id)
        except KeyError:
            pass
        # Hooks see aborted requests too (finish_reason "abort"), e.g. to drop activations stashed for them.
        self._notify_finished(t, t.last_output, time.monotonic(), reason="abort")

    def _dispatch(self, outputs: list[Any]) -> None:
        now = time.monotonic()
        m = self.metrics
        # One wake-up per event loop per step (not one per request): with hundreds of sequences in a batch, a
        # call_soon_threadsafe per output would cost a self-pipe write and a GIL hand-off each.
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any, str]]] = {}
        for out in outputs:
            t = self._tracked.get(out.request_id)
            if t is None:
                continue
            n = len(out.new_token_ids)
            if n:
                if t.first_token_at is None:
                    t.first_token_at = now
                    if m is not None:
                        m.on_first_token(t.lora_name, now - t.arrival, out.num_prompt_tokens)
                        m.on_tokens(t.lora_name, n, None)
                elif m is not None:
                    m.on_tokens(t.lora_name, n, now - (t.last_token_at or now))
                t.last_token_at = now
            t.last_output = out
            if out.finished:
                # Metrics and hooks first: a client that got its response may scrape or send feedback at once.
                self._tracked.pop(out.request_id, None)
                if m is not None:
                    m.on_finished(t.lora_name, now - t.arrival)
                self._notify_finished(t, out, now)
            batches.setdefault(t.loop, []).append((t.queue, out, out.request_id))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the handlers' loop is closed: nobody is listening
                for _q, out, request_id in items:
                    if not out.finished:
                        self._do_abort(request_id)

    def _notify_finished(self, t: _Tracked, out: Any, now: float, reason: str | None = None) -> None:
        if not self._plugins:
            return
        record = FinishedRequest(
            request_id=t.request_id,
            lora_name=t.lora_name,
            lora_version=getattr(out, "lora_version", None),
            prompt_token_ids=t.prompt_token_ids,
            output_token_ids=list(out.output_token_ids) if out is not None else [],
            text=out.text if out is not None else "",
            finish_reason=reason or (out.finish_reason if out is not None else None),
            arrival_time=t.arrival,
            finish_time=now,
            extra=t.extra,
        )
        for plugin in list(self._plugins):
            try:
                plugin.on_finish(record)
            except Exception:  # noqa: BLE001 - a plugin must never take serving down
                log.exception("plugin %r failed on a finished request", plugin)

    def _refresh_counts(self) -> None:
        """The waiting count the 429 check uses, every step; cheap (full stats walk every adapter version)."""
        waiting = getattr(getattr(self._engine, "scheduler", None), "waiting", None)
        n = len(waiting) if waiting is not None else int(self._engine.stats().num_waiting)
        with self._lock:
            self._num_waiting = n

    def _refresh(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_snapshot < self.snapshot_interval_s:
            return
        self._last_snapshot = now
        snap = read_snapshot(self._engine, self.metrics)
        if self.metrics is not None:
            publish_snapshot(self.metrics, snap, self._engine)  # before the snapshot: readers of it see metrics too
        self._snapshot = snap
        with self._lock:
            self._num_waiting = snap.num_waiting

    def _die(self, reason: str) -> None:
        self._error = reason
        self._wake.set()
        for t in list(self._tracked.values()):
            try:
                t.loop.call_soon_threadsafe(t.queue.put_nowait, EngineDeadError(reason))
            except RuntimeError:
                pass
        self._tracked.clear()
        self._fail_commands()

    def _fail_commands(self) -> None:
        err = EngineDeadError(self._error or "engine thread is not running")
        while True:
            try:
                kind, _a, _b, fut = self._cmds.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._lock:
                    self._pending_adds -= 1
            if fut is not None and fut.set_running_or_notify_cancel():
                fut.set_exception(err)


def _deliver(items: list[tuple[asyncio.Queue, Any, str]]) -> None:
    for q, out, _request_id in items:
        q.put_nowait(out)
