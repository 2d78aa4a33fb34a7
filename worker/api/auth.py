"""Who may call which route: the worker's one authorization model (the table is in docs/worker-api.md).

Three credentials, each optional, each a bearer token compared in constant time and never logged:
- the admin token (`--admin-token-file`): every route that changes state (adapters, training jobs, the versions
  and checkpoints those jobs write) and the routes that show host paths. Without one, admin routes answer only
  callers on the loopback interface, so a worker started by hand is usable and a worker on a network is not open;
- the API key (`--api-key`, vLLM's flag): the OpenAI inference routes, as vLLM guards them (401 for a missing or
  wrong key); the admin token is accepted there too, so the operator needs one credential;
- the feedback key (`--feedback-api-key`): `/v1/feedback`; without it feedback takes the API key's rule.
Health, readiness, version and metrics stay open, as in vLLM: probes and Prometheus carry no credentials.
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request
from lorafleet.worker.api.errors import APIError
from lorafleet.worker.api.settings import ApiSettings

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def bearer(request: Request) -> str | None:
    """The bearer token of the request, or None when there is none."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def matches(given: str | None, expected: str | None) -> bool:
    """Constant-time equality (the time does not tell how much of a guess was right)."""
    if given is None or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def _loopback(request: Request) -> bool:
    host = request.client.host if request.client is not None else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _settings(request: Request) -> ApiSettings:
    return request.app.state.settings


def is_admin(request: Request) -> bool:
    """True when the caller presents the admin token (or, with none configured, calls from loopback)."""
    settings = _settings(request)
    if not settings.admin_token:
        return _loopback(request)
    return matches(bearer(request), settings.admin_token)


def require_admin(request: Request) -> None:
    """Admin routes: missing token 401, wrong token 403; no token configured: loopback callers only (403)."""
    settings = _settings(request)
    if not settings.admin_token:
        if _loopback(request):
            return
        raise APIError(403, "admin endpoint: this worker has no admin token; only loopback callers may use it")
    token = bearer(request)
    if token is None:
        raise APIError(401, "admin endpoint: missing bearer token", headers=_CHALLENGE)
    if not matches(token, settings.admin_token):
        raise APIError(403, "admin endpoint: invalid token")


def _require_key(request: Request, key: str | None, what: str) -> None:
    if not key:
        return
    token = bearer(request)
    if matches(token, key) or matches(token, _settings(request).admin_token):
        return
    raise APIError(401, f"{what}: missing or invalid API key", err_type="AuthenticationError", headers=_CHALLENGE)


def require_api_key(request: Request) -> None:
    """Inference routes, vLLM's `--api-key`: with a key configured, the key (or the admin token) or 401."""
    if request.method == "OPTIONS":  # CORS preflight carries no credentials (browsers never send them there)
        return
    _require_key(request, _settings(request).api_key, "inference endpoint")


def require_feedback_key(request: Request) -> None:
    """`/v1/feedback`: its own key when configured, else the API key's rule."""
    settings = _settings(request)
    if settings.feedback_api_key:
        _require_key(request, settings.feedback_api_key, "feedback endpoint")
    else:
        require_api_key(request)
