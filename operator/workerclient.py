"""Async client of one worker's HTTP API, with retries, backoff and the admin bearer token.

Two flavours behind one interface: our engine (`/v1/adapters` tells state, version and in-flight counts) and stock
vLLM (only `load_lora_adapter` / `unload_lora_adapter`, `/v1/models` and `vllm:*` metrics). Transport failures,
429 and 5xx are retried with exponential backoff; other 4xx are the worker's verdict and surface as `WorkerError`
with its message (e.g. a source it cannot read), never as an operator crash.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from lorafleet.operator import scrape, vllm_load

log = logging.getLogger(__name__)

RETRY_STATUS = {429, 500, 502, 503, 504}


class WorkerError(Exception):
    """The worker answered, or could not be reached after all retries (status 0)."""

    def __init__(self, status: int, message: str, url: str = "") -> None:
        super().__init__(f"{url}: HTTP {status}: {message}" if url else f"HTTP {status}: {message}")
        self.status = status
        self.message = message


@dataclass
class AdapterInfo:
    """One adapter as a worker reports it; `running + waiting` is the in-flight count the handoff waits on."""

    name: str
    state: str = "loaded"
    version: str | None = None
    rank: int | None = None
    tier: str | None = None
    running: int = 0
    waiting: int = 0
    rate: float = 0.0
    path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def in_flight(self) -> int:
        return self.running + self.waiting

    @property
    def servable(self) -> bool:
        return self.state.lower() not in {"loading", "unloading", "failed", "error", "registered-failed"}


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err if err else body.get("detail") or body)
    return str(body)


def parse_adapters(body: Any) -> list[AdapterInfo]:
    """Accepts `{"data": [...]}`, `{"adapters": [...]}` or a bare list, so small API shape choices do not break us."""
    items = body
    if isinstance(body, dict):
        items = body.get("data", body.get("adapters", []))
    out = []
    for item in items or []:
        if isinstance(item, str):
            out.append(AdapterInfo(name=item))
            continue
        name = item.get("name") or item.get("id") or item.get("lora_name")
        if not name:
            continue
        version = item.get("version")
        out.append(
            AdapterInfo(
                name=str(name),
                state=str(item.get("state") or "loaded"),
                version=None if version is None else str(version),
                rank=item.get("rank"),
                tier=item.get("tier"),
                running=int(item.get("running") or 0),
                waiting=int(item.get("waiting") or 0),
                rate=float(item.get("request_rate", item.get("rate")) or 0.0),
                path=item.get("path") or item.get("lora_path") or item.get("source"),
                extra=dict(item),
            )
        )
    return out


class WorkerClient:
    """Our engine's API. One instance per worker endpoint; cheap, holds a pooled httpx client."""

    engine = "lorafleet"

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 4,
        backoff: float = 0.1,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.retries = retries
        self.backoff = backoff
        self._client = client or httpx.AsyncClient(timeout=timeout)
        self.loads = 0
        self.unloads = 0

    async def aclose(self) -> None:
        await self._client.aclose()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def request(
        self, method: str, path: str, *, json: Any = None, retries: int | None = None, timeout: float | None = None
    ) -> httpx.Response:
        url = f"{self.base_url}{path}"
        attempts = (self.retries if retries is None else retries) + 1
        delay = self.backoff
        last: WorkerError | None = None
        for attempt in range(attempts):
            try:
                kwargs: dict[str, Any] = {"headers": self._headers()}
                if json is not None:
                    kwargs["json"] = json
                if timeout is not None:
                    kwargs["timeout"] = timeout
                resp = await self._client.request(method, url, **kwargs)
            except httpx.HTTPError as exc:
                last = WorkerError(0, f"{type(exc).__name__}: {exc}", url)
            else:
                if resp.status_code < 400:
                    return resp
                last = WorkerError(resp.status_code, _error_message(resp), url)
                if resp.status_code not in RETRY_STATUS:
                    raise last
                retry_after = resp.headers.get("retry-after")
                if retry_after:
                    try:
                        delay = max(delay, min(float(retry_after), 5.0))
                    except ValueError:
                        pass
            if attempt + 1 < attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        assert last is not None
        raise last

    async def ready(self) -> bool:
        try:
            resp = await self.request("GET", "/ready", retries=0, timeout=2.0)
        except WorkerError:
            return False
        return resp.status_code == 200

    async def adapters(self) -> list[AdapterInfo]:
        resp = await self.request("GET", "/v1/adapters", retries=1, timeout=5.0)
        return parse_adapters(resp.json())

    async def models(self) -> list[dict[str, Any]]:
        resp = await self.request("GET", "/v1/models", retries=1, timeout=5.0)
        return list(resp.json().get("data", []))

    async def metrics_text(self) -> str:
        resp = await self.request("GET", "/metrics", retries=0, timeout=5.0)
        return resp.text

    async def load(self, name: str, path: str, *, inplace: bool = False) -> None:
        """Loads an adapter; `inplace` swaps a held adapter to a new version (in-flight requests keep the old one).

        A worker that already holds it answers 'already loaded', which is success: loads are idempotent.
        """
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if inplace:
            body["load_inplace"] = True
        try:
            await self.request("POST", "/v1/load_lora_adapter", json=body)
        except WorkerError as exc:
            if exc.status in (400, 409) and "already" in exc.message.lower():
                return
            raise
        self.loads += 1

    async def unload(self, name: str) -> None:
        try:
            await self.request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        except WorkerError as exc:
            msg = exc.message.lower()
            if exc.status in (400, 404) and any(k in msg for k in ("not found", "cannot be found", "unknown")):
                return
            raise
        self.unloads += 1

    async def in_flight(self, name: str) -> int:
        for info in await self.adapters():
            if info.name == name:
                return info.in_flight
        return 0

    async def drain_mark(self) -> float | None:
        """What a drain compares later answers to (None here: `/v1/adapters` counts are exact and current)."""
        return None

    async def drained(self, name: str, since: float | None) -> bool:
        """True when `name` has no request running or waiting on this worker."""
        return await self.in_flight(name) == 0

    async def load_report(self) -> scrape.WorkerLoad:
        return scrape.parse_metrics(await self.metrics_text())

    # --- continual learning (the worker's training API; see worker/api/training.py) ---
    async def post(self, path: str, body: Any) -> Any:
        resp = await self.request("POST", path, json=body)
        return resp.json() if resp.content else {}

    async def get(self, path: str) -> Any:
        resp = await self.request("GET", path, retries=1)
        return resp.json()


class VLLMWorkerClient(WorkerClient):
    """Stock vLLM: adapters come from `/v1/models` (entries with a parent), in-flight from `vllm:lora_requests_info`,
    per-adapter rates from successive scrapes (`vllm_load.py`)."""

    engine = "vllm"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rates = vllm_load.RateTracker()

    async def load_report(self) -> scrape.WorkerLoad:
        load = scrape.parse_metrics(await self.metrics_text())
        load.adapter_rate = self.rates.update(load, time.monotonic())
        return load

    async def drain_mark(self) -> float | None:
        return (await self.load_report()).newest_ts

    async def drained(self, name: str, since: float | None) -> bool:
        return vllm_load.drained(name, await self.load_report(), since)

    async def ready(self) -> bool:
        try:
            resp = await self.request("GET", "/health", retries=0, timeout=2.0)
        except WorkerError:
            return False
        return resp.status_code == 200

    async def adapters(self) -> list[AdapterInfo]:
        models = await self.models()
        load = None
        try:
            load = await self.load_report()
        except WorkerError:
            pass
        out = []
        for m in models:
            if not m.get("parent"):
                continue
            name = str(m.get("id"))
            running, waiting = vllm_load.in_flight(name, load)
            out.append(AdapterInfo(name=name, running=running, waiting=waiting, path=m.get("root")))
        return out


def make_client(engine: str, base_url: str, token: str | None, **kwargs: Any) -> WorkerClient:
    cls = VLLMWorkerClient if engine == "vllm" else WorkerClient
    return cls(base_url, token, **kwargs)
