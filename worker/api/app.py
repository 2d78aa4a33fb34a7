"""FastAPI app factory: `create_app(runner, settings)`.

The continual-learning routes live in `worker/api/training.py` (an `APIRouter` named `router`), included here when
that module exists; they reach the engine through `request.app.state.runner` (an `AsyncEngineRunner`: `call()` runs
a function in the engine thread between iterations, `finish_hooks` see every finished request) and register their
metrics on `app.state.metrics.registry`.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from lorafleet.worker.api import routes_admin, routes_health, routes_openai
from lorafleet.worker.api.errors import APIError, api_error_handler, make_handlers
from lorafleet.worker.api.settings import ApiSettings
from lorafleet.worker.async_engine import AsyncEngineRunner
from lorafleet.worker.gpu import GpuCollector
from lorafleet.worker.metrics import WorkerMetrics
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


def _training_router():
    try:
        from lorafleet.worker.api.training import router
    except ModuleNotFoundError as exc:
        if exc.name == "lorafleet.worker.api.training":
            return None
        raise
    return router


def create_app(runner: AsyncEngineRunner, settings: ApiSettings, *, gpu_metrics: bool = True) -> FastAPI:
    """Builds the app around a started (or starting) runner; the runner's `metrics` become `/metrics`."""
    app = FastAPI(title="lorafleet worker", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runner = runner
    app.state.settings = settings
    app.state.metrics = runner.metrics
    if runner.metrics is not None and gpu_metrics:
        runner.metrics.registry.register(GpuCollector())
    own = [routes_openai.router, routes_admin.router, routes_health.router]
    for r in own:
        app.include_router(r)
    own_paths = frozenset(getattr(route, "path", "") for r in own for route in r.routes)
    training = _training_router()
    if training is not None:
        app.include_router(training)
        from lorafleet.worker.api.training import attach  # starts the request log + training service now

        attach(app)
        log.info("continual-learning routes enabled")
    validation_handler, http_handler = make_handlers(own_paths)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(StarletteHTTPException, http_handler)
    return app


def new_metrics(settings: ApiSettings, max_loras: int = 0, max_adapter_labels: int = 64) -> WorkerMetrics:
    return WorkerMetrics(settings.served_model_name, max_loras=max_loras, max_adapter_labels=max_adapter_labels)
