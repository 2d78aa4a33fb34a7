"""Runs the worker app under a real uvicorn server in a background thread (tests, benchmarks, local mode).

Why a real server instead of an in-process ASGI client: streaming, client disconnects and Prometheus scraping are
only meaningful over a real socket.
"""

from __future__ import annotations

import threading
import time

import uvicorn


class ServerThread:
    """uvicorn on 127.0.0.1 with an ephemeral port; `url` is valid after `start()`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        config = uvicorn.Config(
            app, host=host, port=port, log_config=None, lifespan="off", loop="asyncio", http="h11", ws="none"
        )
        self.server = uvicorn.Server(config)
        self.host = host
        self.port = port
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("uvicorn exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)


class Worker:
    """A running worker (engine thread + HTTP server) for tests; `close()` stops both."""

    def __init__(self, runner, server: ServerThread, app) -> None:
        self.runner = runner
        self.server = server
        self.app = app

    @property
    def url(self) -> str:
        return self.server.url

    def call(self, fn, timeout: float = 30.0):
        """Runs `fn(engine)` in the engine thread between iterations (e.g. `lambda e: e.stats()`)."""
        return self.runner.call_threadsafe(fn).result(timeout)

    def close(self) -> None:
        self.server.stop()
        for hook in list(getattr(self.app.state, "shutdown_hooks", [])):
            hook()
        self.runner.stop()


def start_worker(
    model_dir: str,
    *,
    served_model_name: str | None = None,
    admin_token: str | None = None,
    max_waiting: int = 0,
    max_adapter_labels: int = 64,
    engine_factory=None,
    wait_ready: bool = True,
    api: dict | None = None,
    **engine_config,
) -> Worker:
    """Starts the real engine (built from `EngineConfig(model_dir, **engine_config)`) behind the real app;
    `api` sets further `ApiSettings` fields (api_key, feedback_adapters, max_body_bytes, ...)."""
    from pathlib import Path

    from lorafleet.worker.api.app import create_app
    from lorafleet.worker.api.settings import ApiSettings
    from lorafleet.worker.async_engine import AsyncEngineRunner
    from lorafleet.worker.config import EngineConfig
    from lorafleet.worker.metrics import WorkerMetrics

    engine_config.setdefault("kv_cache_bytes", 8 << 20)
    cfg = EngineConfig(model=str(model_dir), **engine_config)
    served = served_model_name or Path(str(model_dir).rstrip("/")).name
    settings = ApiSettings(served_model_name=served, model_path=str(model_dir), admin_token=admin_token, **(api or {}))
    metrics = WorkerMetrics(served, max_loras=cfg.max_loras, max_adapter_labels=max_adapter_labels)

    def build():
        from lorafleet.worker.engine.llm_engine import LLMEngine

        return LLMEngine(cfg)

    from lorafleet.worker.training.service import register

    runner = AsyncEngineRunner(engine_factory or build, metrics=metrics, max_waiting=max_waiting)
    training = register(runner, metrics.registry)  # as worker/main.py does
    runner.start()
    if wait_ready and not runner.wait_ready(120):
        runner.stop()
        raise RuntimeError(f"engine did not start: {runner.error}")
    app = create_app(runner, settings, training=training)
    server = ServerThread(app).start()
    return Worker(runner, server, app)


def assert_openai_error(r, status: int, err_type: str | None = None) -> dict:
    """Asserts an OpenAI-shaped error response with this status; returns its `error` object."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["code"] == status and isinstance(err["message"], str) and err["message"], err
    if err_type is not None:
        assert err["type"] == err_type, err
    return err


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.01):
    """Polls `predicate` until truthy or the timeout; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def wait_process_ready(proc, url: str, log_path, timeout: float = 120.0) -> None:
    """Waits until the worker process `proc` answers `/ready` with 200; fails with its log's tail if it exits or
    the timeout passes first."""
    import httpx

    def ready() -> bool:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            return httpx.get(f"{url}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_for(ready, timeout=timeout, interval=0.2), log_path.read_text()[-3000:]
