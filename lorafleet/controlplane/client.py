"""A minimal HTTPS client for the API server and component health endpoints (stdlib only, so starting a control
plane never depends on the kubernetes Python client)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from lorafleet.controlplane.pki import KeyPair


class ApiError(RuntimeError):
    """Non-2xx answer; `status` is the HTTP code and `body` the decoded Status object when there is one."""

    def __init__(self, status: int, body: Any) -> None:
        message = body.get("message", body) if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body


class HttpsClient:
    """Talks TLS to `base_url`, verifying it against `ca_cert` and presenting `client` if given."""

    def __init__(self, base_url: str, ca_cert: Path, client: KeyPair | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.context = ssl.create_default_context(cafile=str(ca_cert))
        if client is not None:
            self.context.load_cert_chain(str(client.cert), str(client.key))

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 30.0, content_type: str = "application/json"
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self.context, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                decoded: Any = json.loads(raw)
            except ValueError:
                decoded = raw.decode(errors="replace")
            raise ApiError(err.code, decoded) from None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def healthy(self, path: str, timeout: float = 5.0) -> bool:
        """True when `path` answers 200 with body `ok` (the /readyz, /healthz convention)."""
        try:
            return str(self.request("GET", path, timeout=timeout)).strip() == "ok"
        except (OSError, ApiError, ssl.SSLError):
            return False
