"""vLLM's dynamic-LoRA admin API (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) plus `/v1/adapters`.

Same messages and status codes as vLLM, so tools made for vLLM (AIBrix, production-stack) drive us unchanged:
200 with a plain-text "Success: ..." body; 400 in the OpenAI error shape when the adapter is already loaded or
invalid, 404 when an unload names an adapter that is not loaded. Loads and unloads run in the engine thread between iterations; an unload does not cut off the
adapter's running requests: the store keeps their slot until they finish, and new requests get 404 at once.

Every route here needs the admin credential (`worker/api/auth.py`; missing token 401, wrong 403). Adapter names
are checked by `lorafleet.worker.names` before any path is looked at; unloading an unknown adapter is 404, as vLLM.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from lorafleet.worker.api.auth import require_admin
from lorafleet.worker.api.errors import APIError
from lorafleet.worker.api.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from lorafleet.worker.api.request_body import read_body
from lorafleet.worker.api.serving import check_serving
from lorafleet.worker.api.settings import ApiSettings
from lorafleet.worker.async_engine import AsyncEngineRunner
from lorafleet.worker.lora.sources.uri import is_remote
from lorafleet.worker.names import InvalidName, adapter_name

router = APIRouter(dependencies=[Depends(require_admin)])


def _runner(request: Request) -> AsyncEngineRunner:
    return request.app.state.runner


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request) -> PlainTextResponse:
    body = await read_body(request, LoadLoRAAdapterRequest)
    runner = _runner(request)
    settings: ApiSettings = request.app.state.settings
    check_serving(runner)
    name, path = body.lora_name, body.lora_path
    if not name or not path:
        raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.", err_type="InvalidUserInput")
    try:
        adapter_name(name)
    except InvalidName as exc:
        raise APIError(400, str(exc), param="lora_name", err_type="InvalidUserInput") from exc
    if name == settings.served_model_name:
        raise APIError(400, f"'{name}' is the base model's name", param="lora_name", err_type="InvalidUserInput")

    sources = getattr(request.app.state, "sources", None)
    if sources is not None and is_remote(path):
        # s3:// and hf:// downloads run here, off the engine thread; the engine then reads the verified cache entry
        try:
            await asyncio.to_thread(sources.fetch, path)
        except ValueError as exc:  # SourceError: names the source; the current version keeps serving
            raise APIError(
                400, f"Loading lora {name} failed: {exc}", param="lora_path", err_type="InvalidUserInput"
            ) from exc

    def load(engine):
        if name in engine.store.names() and not body.load_inplace:
            raise FileExistsError(name)
        started = time.perf_counter()
        engine.load_adapter(name, path)
        return time.perf_counter() - started

    try:
        seconds = await runner.call(load, publish=True)
    except FileExistsError as exc:
        raise APIError(
            400, f"The lora adapter '{name}' has already been loaded.", param="lora_name", err_type="InvalidUserInput"
        ) from exc
    except (ValueError, OSError, KeyError, TypeError, OverflowError) as exc:
        raise APIError(
            400, f"Loading lora {name} failed: {exc}", param="lora_path", err_type="InvalidUserInput"
        ) from exc
    metrics = request.app.state.metrics
    if metrics is not None:
        metrics.on_adapter_load(seconds)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request) -> PlainTextResponse:
    body = await read_body(request, UnloadLoRAAdapterRequest)
    runner = _runner(request)
    check_serving(runner)
    name = body.lora_name.strip()
    if not name:
        raise APIError(400, "'lora_name' needs to be provided to unload a LoRA adapter.", err_type="InvalidUserInput")
    try:
        adapter_name(name)
    except InvalidName as exc:
        raise APIError(400, str(exc), param="lora_name", err_type="InvalidUserInput") from exc

    def unload(engine):
        if name not in engine.store.names():
            raise LookupError(name)
        engine.unload_adapter(name)

    try:
        await runner.call(unload, publish=True)
    except LookupError as exc:
        raise APIError(
            404, f"The lora adapter '{name}' cannot be found.", param="lora_name", err_type="NotFoundError"
        ) from exc
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


@router.get("/v1/adapters")
async def list_adapters(request: Request) -> JSONResponse:
    runner = _runner(request)
    check_serving(runner)
    snap = await runner.fresh_snapshot()
    metrics = request.app.state.metrics
    data = []
    for info in snap.adapters:
        item = asdict(info)
        if metrics is not None:
            item["request_rate"] = metrics.rates.rate(info.name)
        data.append(item)
    config = getattr(runner.engine, "config", None)
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "max_loras": getattr(config, "max_loras", None),
            "max_cpu_loras": getattr(config, "max_cpu_loras", None),
            "max_lora_rank": getattr(config, "max_lora_rank", None),
            # the adapter-weight budget when the engine has one (None: bounded by max_cpu_loras only), and what the
            # listed adapters take of it, so the operator can check its capacity model against the worker's view
            "adapter_memory_bytes": getattr(config, "adapter_memory_bytes", None),
            "adapter_bytes_used": sum(int(item.get("size_bytes") or 0) for item in data),
        }
    )
