"""Applies a BaseModel's children (admin Secret, worker Deployment, Service, PDB) and reports what was refused.

Called by the fleet loop whenever a child changed (watch events), the spec changed, the Deployment's replica count
must change (scale-down drains first), and on every periodic resync, so a deleted, scaled or edited child is
repaired from any cause. Every child is server-side applied (`kube.Kube.apply`), so the object ends up exactly as
the builders in `resources.py` say. The Secret is the exception: it is created once and never rewritten (rotating
the token would lock the workers out); if it is deleted, a new token is created and the worker pods roll (the pod
template carries the token's hash), because the running ones still hold the old one.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubernetes.client.rest import ApiException
from lorafleet.operator import constants as c
from lorafleet.operator import resources as res

if TYPE_CHECKING:
    from lorafleet.operator.kube import Kube

ANNOT_TOKEN_HASH = "lorafleet.io/admin-token-sha256"


@dataclass(frozen=True)
class ChildFailure:
    """A child the API server refused, with its own words (what the user must fix)."""

    kind: str
    name: str
    status: int
    message: str

    def describe(self) -> str:
        return f"{self.kind} {self.name} refused by the API server (HTTP {self.status}): {self.message}"


@dataclass
class ChildrenResult:
    token: str | None
    failures: list[ChildFailure]
    versions: dict[tuple[str, str], str]  # (kind, name) -> resourceVersion we left it at


def api_message(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, the API server's message) of a failed call."""
    if isinstance(exc, ApiException):
        try:
            body = json.loads(exc.body or "{}")
        except (TypeError, ValueError):
            body = {}
        msg = body.get("message") if isinstance(body, dict) else None
        return int(exc.status or 0), str(msg or exc.reason or exc)
    return 0, f"{type(exc).__name__}: {exc}"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def desired_deployment(bm: Mapping[str, Any], adapter_root: str, replicas: int, token: str | None) -> dict[str, Any]:
    """The worker Deployment with the replica count the scale plan allows and the token hash on its pods."""
    dep = res.worker_deployment(bm, adapter_root)
    dep["spec"]["replicas"] = int(replicas)
    if token:
        tmpl = dep["spec"]["template"].setdefault("metadata", {})
        tmpl.setdefault("annotations", {})[ANNOT_TOKEN_HASH] = token_hash(token)
    return dep


async def ensure_secret(kube: Kube, bm: Mapping[str, Any]) -> str | None:
    """The admin token: read back, or created (new random token) when the Secret does not exist."""
    name = res.admin_secret_name(bm["metadata"]["name"])
    ns = bm["metadata"]["namespace"]
    secret = await kube.get_or_none("Secret", ns, name)
    if secret is None:
        secret, _ = await kube.create_once(res.admin_secret(bm, res.new_admin_token()))
    data = (secret or {}).get("data") or {}
    if c.ADMIN_TOKEN_KEY not in data:
        return None
    return base64.b64decode(data[c.ADMIN_TOKEN_KEY]).decode()


async def reconcile(kube: Kube, bm: Mapping[str, Any], *, adapter_root: str, replicas: int) -> ChildrenResult:
    """Applies every child; a refused one is recorded and the others are still applied."""
    failures: list[ChildFailure] = []
    versions: dict[tuple[str, str], str] = {}
    token: str | None = None
    secret_name = res.admin_secret_name(bm["metadata"]["name"])
    try:
        token = await ensure_secret(kube, bm)
    except Exception as exc:  # noqa: BLE001 - reported on the BaseModel, never raised into the loop
        failures.append(ChildFailure("Secret", secret_name, *api_message(exc)))
    children = [
        desired_deployment(bm, adapter_root, replicas, token),
        res.worker_service(bm),
        res.worker_pdb(bm),
    ]
    for body in children:
        name = body["metadata"]["name"]
        try:
            out = await kube.apply(body)
        except Exception as exc:  # noqa: BLE001
            failures.append(ChildFailure(body["kind"], name, *api_message(exc)))
            continue
        versions[(body["kind"], name)] = str((out.get("metadata") or {}).get("resourceVersion", ""))
    return ChildrenResult(token, failures, versions)


class Keeper:
    """When the children are applied again: after a watch event this fleet did not cause (the resourceVersion
    differs from what its own last apply left), a new generation or replica count, a failure (retried in 5 s), or
    the periodic resync."""

    def __init__(self, resync: float) -> None:
        self.resync = resync
        self.failures: list[ChildFailure] = []
        self._dirty = True
        self._due = 0.0
        self._key: tuple[Any, ...] | None = None
        self._versions: dict[tuple[str, str], str] = {}

    def changed(self, kind: str, name: str, resource_version: str | None, deleted: bool) -> bool:
        """A watch event on a child; True when it must be re-applied."""
        if deleted or self._versions.get((kind, name)) != resource_version:
            self._dirty = True
        return self._dirty

    def due(self, key: tuple[Any, ...], now: float) -> bool:
        return self._dirty or key != self._key or now >= self._due

    def start(self, key: tuple[Any, ...]) -> None:
        """Before an apply: a watch event that arrives during it marks the children dirty again."""
        self._dirty = False
        self._key = key

    def applied(self, result: ChildrenResult, now: float) -> None:
        self._due = now + (5.0 if result.failures else self.resync)
        self._versions.update(result.versions)
        self.failures = result.failures
