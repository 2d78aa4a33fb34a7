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
