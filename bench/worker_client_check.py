"""The operator's worker client (`lorafleet.operator.workerclient`) against a live server: stock vLLM or our worker.

Why: the operator drives stock vLLM pods through `VLLMWorkerClient` (load, unload, in-place reload, `/v1/models`,
the `vllm:*` metrics scrape) and had only met our worker and fakes. `vs_vllm.py` runs this against the real
`vllm serve` it starts on the GPU machine (and against our worker, with `WorkerClient`), and records each step.

Steps, each recorded as ok/failed with its detail: ready; load a new adapter; it is listed by `adapters()` (from
`/v1/models` for vLLM); a completion through every adapter named; in-place reload of the new adapter from a second
path, then a completion through it; a repeated load is accepted (idempotent); the metrics page parses into a
`WorkerLoad`; unload; it is gone from the listing; a repeated unload is accepted.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any


async def _completion(client, name: str) -> dict[str, Any]:
    body = {"model": name, "prompt": "w10 w11 w12 w13", "max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
    out = await client.post("/v1/completions", body)
    usage = out.get("usage") or {}
    if usage.get("completion_tokens") != 4 or not out.get("choices"):
        raise AssertionError(f"unexpected completion for {name}: {out}")
    return {"text": out["choices"][0].get("text"), "usage": usage}


async def check(engine: str, url: str, new: tuple[str, Path], reload_path: Path, serve: list[str]) -> dict:
    """`engine` is "vllm" or "lorafleet"; `new` = (name, path) of an adapter the server does not hold yet;
    `serve` names adapters it already holds (a completion goes through each)."""
    from lorafleet.operator.workerclient import make_client

    client = make_client(engine, url, None, timeout=60.0)
    steps: dict[str, dict[str, Any]] = {}

    async def step(name: str, fn) -> Any:
        t = time.perf_counter()
        try:
            detail = await fn()
            steps[name] = {"ok": True, "s": round(time.perf_counter() - t, 4), "detail": detail}
            return detail
        except Exception as exc:  # noqa: BLE001 - every step is reported, a failure does not hide the rest
            steps[name] = {"ok": False, "s": round(time.perf_counter() - t, 4), "error": f"{type(exc).__name__}: {exc}"}
            return None

    name, path = new

    async def listed() -> list[str]:
        names = [a.name for a in await client.adapters()]
        if name not in names:
            raise AssertionError(f"{name} not in {names}")
        return names

    async def gone() -> list[str]:
        names = [a.name for a in await client.adapters()]
        if name in names:
            raise AssertionError(f"{name} still in {names}")
        models = [m.get("id") for m in await client.models()]
        if name in models:
            raise AssertionError(f"{name} still in /v1/models {models}")
        return names

    async def completions() -> dict[str, Any]:
        return {n: await _completion(client, n) for n in [*serve, name]}

    async def metrics() -> dict[str, Any]:
        load = await client.load_report()
        return {
            "running": load.running,
            "waiting": load.waiting,
            "kv_usage": load.kv_usage,
            "max_lora": load.max_lora,
            "lora_running": sorted(load.lora_running),
        }

    try:
        await step("ready", client.ready)
        await step("load", lambda: client.load(name, str(path)))
        await step("listed", listed)
        await step("completion_per_adapter", completions)
        await step("reload_inplace", lambda: client.load(name, str(reload_path), inplace=True))
        await step("completion_after_reload", lambda: _completion(client, name))
        await step("load_again_idempotent", lambda: client.load(name, str(reload_path)))
        await step("metrics_scrape", metrics)
        await step("unload", lambda: client.unload(name))
        await step("gone", gone)
        await step("unload_again_idempotent", lambda: client.unload(name))
    finally:
        await client.aclose()
    return {"engine": engine, "ok": all(s["ok"] for s in steps.values()), "steps": steps}


def run_check(engine: str, url: str, new: tuple[str, Path], reload_path: Path, serve: list[str]) -> dict:
    return asyncio.run(check(engine, url, new, reload_path, serve))
