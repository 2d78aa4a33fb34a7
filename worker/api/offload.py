"""The bounded thread pool that takes the HTTP layer's CPU-heavy work off the event loop, with admission.

Why: the event loop answers `/health`, `/ready` and every stream; anything that holds it for long (parsing and
validating a 1 MiB body, tokenizing it, rendering a chat template, serialising a 400k-token `/tokenize` answer)
stalls all of them. That work runs here instead. Why bounded, with admission: a pool with an unbounded queue turns
a burst of hostile 1 MiB requests into minutes of queued work and memory held for it; here at most
`threads + backlog` large jobs are admitted (running or waiting) and the next one is refused at once with 429 and
`Retry-After`, so the client backs off and the worker keeps its latency. Small jobs have a pool of their own, so an
ordinary request never waits behind (or is refused because of) someone's megabyte. A job that times out (a template render)
keeps its slot until its thread really finishes: a thread cannot be killed, and its CPU is still spent.

Why threads and not processes: the heavy parts are the Rust tokenizer (it releases the GIL) and short C calls; the
pure-Python parts release the GIL every switch interval. The rule for code run here is to keep each single C call
short (see `json_bytes`: big lists are serialised in slices), because a C call never lets the loop take the GIL.

Why the heavy pool runs at a lower CPU priority (niceness +`HEAVY_NICE`, per thread on Linux): the GIL is not all
the loop waits for. A tokenizer that released the GIL still takes a core, and with more busy threads than cores the
kernel shares time evenly, so on a 2-core worker under a megabyte flood the loop waited whole time slices for a
CPU. Niced, the heavy threads yield the CPU to the loop and the engine thread whenever those are runnable, and use
all of it when they are not: nothing is refused or slower on an idle worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from lorafleet.worker.api.errors import APIError

T = TypeVar("T")
SLICE = 8192  # list items serialised per C call (~1 ms): the loop waits at most about that for the GIL
HEAVY = 64 << 10  # a job whose input is larger (characters, bytes or token ids) is heavy: admitted, or refused
HEAVY_NICE = 10  # niceness added to each heavy-pool thread (CFS weight ~1/10 of the loop's)


def lower_thread_priority(nice: int = HEAVY_NICE) -> None:
    """Raises the calling thread's niceness by `nice` (Linux threads have their own; elsewhere a no-op). Raising it
    needs no privilege."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError):  # no per-thread priority here: the pool runs at the process's
        pass


class Busy(Exception):
    """More heavy work is admitted than the pool takes; the request is refused (429), not queued."""


class Offload:
    """Two pools of `threads` workers: light jobs (inputs up to HEAVY: an ordinary prompt, a chat template) are
    always taken and never wait behind heavy ones; heavy jobs are admitted while fewer than `threads + backlog` are
    running or waiting. `heavy_admitted` and `refused` are for tests and metrics."""

    def __init__(self, threads: int = 4, backlog: int = 8, name: str = "lorafleet-offload") -> None:
        if threads < 1 or backlog < 0:
            raise ValueError("offload needs threads >= 1 and backlog >= 0")
        self.limit = threads + backlog
        self.heavy_admitted = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._light = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"{name}-light")
        self._heavy = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix=name, initializer=lower_thread_priority
        )

    def submit(self, fn: Callable[..., T], *args: Any, cost: int = 0) -> concurrent.futures.Future:
        """Runs `fn(*args)` in the pool for its `cost`; a heavy job is admitted or raises Busy, and its slot is freed
        when it ends (success, error or timeout)."""
        if cost <= HEAVY:
            return self._light.submit(fn, *args)
        with self._lock:
            if self.heavy_admitted >= self.limit:
                self.refused += 1
                raise Busy(f"{self.heavy_admitted} large requests are in progress (limit {self.limit})")
            self.heavy_admitted += 1
        try:
            future = self._heavy.submit(fn, *args)
        except BaseException:
            self._release(None)
            raise
        future.add_done_callback(self._release)
        return future

    def _release(self, _future: concurrent.futures.Future | None) -> None:
        with self._lock:
            self.heavy_admitted -= 1

    async def run(
        self, fn: Callable[..., T], *args: Any, cost: int = 0, timeout_s: float | None = None, what: str = "work"
    ) -> T:
        """Runs `fn(*args)` in the pool and returns its result; Busy is a 429; past `timeout_s` from the job's
        start (not its wait in the queue) a 400, while the job goes on alone, holding its slot."""
        started: concurrent.futures.Future = concurrent.futures.Future()

        def job() -> T:
            started.set_result(None)
            return fn(*args)

        try:
            future = self.submit(job, cost=cost)
        except Busy as exc:
            raise APIError(429, f"the worker is busy: {exc}; retry later", headers={"Retry-After": "1"}) from exc
        done = asyncio.shield(asyncio.wrap_future(future))
        if timeout_s is not None:
            await asyncio.wait({asyncio.wrap_future(started), done}, return_when=asyncio.FIRST_COMPLETED)
        try:
            return await asyncio.wait_for(done, timeout_s)
        except TimeoutError as exc:
            raise APIError(400, f"{what} took longer than {timeout_s:g} s") from exc

    def close(self) -> None:
        self._light.shutdown(wait=False, cancel_futures=True)
        self._heavy.shutdown(wait=False, cancel_futures=True)


def json_bytes(content: Any) -> bytes:
    """`content` as the bytes Starlette's JSONResponse sends (UTF-8, compact, no NaN), with every long list at the
    top level of a dict serialised slice by slice, so no single C call holds the GIL for long."""
    if not isinstance(content, dict):
        return _dumps(content).encode()
    parts = []
    for key, value in content.items():
        if isinstance(value, list) and len(value) > SLICE:
            items = ",".join(_dumps(value[i : i + SLICE])[1:-1] for i in range(0, len(value), SLICE))
            parts.append(f"{_dumps(key)}:[{items}]")
        else:
            parts.append(f"{_dumps(key)}:{_dumps(value)}")
    return ("{" + ",".join(parts) + "}").encode()


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
