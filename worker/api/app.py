"""FastAPI app factory: `create_app(runner, settings)`.

The continual-learning routes live in `worker/api/training.py` (an `APIRouter` named `router`), included here when
that module exists, and its `attach(app)` is called once (the training service then sees all traffic); they reach the
engine through `request.app.state.runner` (an `AsyncEngineRunner`: `call()` runs a function in the engine thread
between iterations; the training service is the engine's plugin, engine/plugin.py) and register their metrics on
`app.state.metrics.registry`. `app.state.shutdown_hooks` run when the worker stops (`lorafleet worker`, tests).
Who may call which route is decided in `auth.py` (table: docs/worker-api.md); `BodyGuard` bounds, checks and parses
every request body (once); `app.state.offload` is the bounded pool for CPU-heavy request work (offload.py), closed
by a shutdown hook; CORS follows vLLM's options (`--allowed-origins`, ...).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from lorafleet.worker.api import routes_admin, routes_health, routes_openai, routes_tokenize
from lorafleet.worker.api.body_guard import BodyGuard
from lorafleet.worker.api.errors import APIError, api_error_handler, internal_error_handler, make_handlers
from lorafleet.worker.api.offload import Offload
from lorafleet.worker.api.settings import ApiSettings
from lorafleet.worker.async_engine import AsyncEngineRunner
from lorafleet.worker.gpu import GpuCollector
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


def _training_module():
    try:
        from lorafleet.worker.api import training
    except ModuleNotFoundError as exc:
        if exc.name == "lorafleet.worker.api.training":
            return None
        raise
    return training


def create_app(runner: AsyncEngineRunner, settings: ApiSettings, *, gpu_metrics: bool = True, training=None) -> FastAPI:
    """Builds the app around a started (or starting) runner; the runner's `metrics` become `/metrics`. `training`:
    the training service already registered as the runner's plugin (`training.service.register`)."""
    app = FastAPI(title="lorafleet worker", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runner = runner
    if training is not None:
        app.state.training = training
    app.state.settings = settings
    app.state.metrics = runner.metrics
    app.state.offload = Offload(settings.offload_threads, settings.offload_backlog)
    if runner.metrics is not None and gpu_metrics:
        runner.metrics.registry.register(GpuCollector())
    own = [routes_openai.router, routes_tokenize.router, routes_admin.router, routes_health.router]
    for r in own:
        app.include_router(r)
    own_paths = frozenset(getattr(route, "path", "") for r in own for route in r.routes)
    app.state.shutdown_hooks = [app.state.offload.close]  # callables run (in order) when the worker stops
    training = _training_module()
    if training is not None:
        app.include_router(training.router)
        attach = getattr(training, "attach", None)
        if callable(attach):
            service = attach(app)  # starts the request log + training service now, so it sees all traffic
            close = getattr(service, "close", None)
            if callable(close):
                app.state.shutdown_hooks.append(close)
        log.info("continual-learning routes enabled")
    validation_handler, http_handler = make_handlers(own_paths)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(StarletteHTTPException, http_handler)
    app.add_exception_handler(Exception, internal_error_handler)  # a bug still answers JSON (and is logged)
    # outermost last: CORS answers preflights before anything else; the body guard runs before any handler
    limits = getattr(training, "BODY_LIMITS", None) if training is not None else None
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, offload=app.state.offload, path_limits=limits)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.allowed_origins,
        allow_credentials=settings.allow_credentials,
        allow_methods=settings.allowed_methods,
        allow_headers=settings.allowed_headers,
    )
    return app
