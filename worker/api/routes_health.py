"""`/health` (the engine thread is alive), `/ready` (the model is loaded), `/version` and `/metrics` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from lorafleet.worker.async_engine import AsyncEngineRunner
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    runner: AsyncEngineRunner = request.app.state.runner
    if runner.alive:
        return Response(status_code=200)
    return JSONResponse({"status": "dead", "reason": runner.error or "engine thread is not running"}, status_code=503)


@router.get("/ready")
async def ready(request: Request) -> Response:
    runner: AsyncEngineRunner = request.app.state.runner
    if runner.ready:
        return JSONResponse({"status": "ready"})
    status = "dead" if runner.error else "loading"
    return JSONResponse({"status": status, "reason": runner.error}, status_code=503, headers={"Retry-After": "5"})


@router.get("/version")
async def version() -> JSONResponse:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        v = package_version("lorafleet")
    except PackageNotFoundError:
        v = "unknown"
    return JSONResponse({"version": v})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    worker_metrics = request.app.state.metrics
    if worker_metrics is None:
        return Response(status_code=404)
    worker_metrics.refresh_rates()
    return Response(generate_latest(worker_metrics.registry), media_type=CONTENT_TYPE_LATEST)
