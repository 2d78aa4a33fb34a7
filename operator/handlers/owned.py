"""Watches on everything the operator owns, so drift from any cause is repaired within a cycle.

Deployments, Services and PodDisruptionBudgets owned by a BaseModel mark its children dirty; Services and
EndpointSlices owned by a LoRAAdapter make its fleet rewrite that adapter's routing. Ownership is read from the
ownerReferences, not from labels, so an object whose labels someone removed is still recognised (and gets them
back). Secrets are not watched (listing Secrets would let the operator read every Secret in the namespace): the
admin Secret is checked on every periodic resync instead. The handlers only wake the level-triggered fleet loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf
from lorafleet.operator import constants as c


def owner(body: Mapping[str, Any], kind: str) -> str | None:
    """Name of the lorafleet.io object of `kind` that controls `body`, if any."""
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == kind and str(ref.get("apiVersion", "")).startswith(f"{c.GROUP}/"):
            return str(ref.get("name"))
    return None


def _of_basemodel(body: kopf.Body, **_: Any) -> bool:
    return owner(body, "BaseModel") is not None


def _of_adapter(body: kopf.Body, **_: Any) -> bool:
    return owner(body, "LoRAAdapter") is not None


@kopf.on.event("apps", "v1", "deployments", when=_of_basemodel)
@kopf.on.event("v1", "services", when=_of_basemodel)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", when=_of_basemodel)
def basemodel_child_changed(namespace: str, body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    fleet = memo.runtime.fleet(namespace, owner(body, "BaseModel"))
    if fleet is not None:
        meta = body.get("metadata") or {}
        fleet.child_changed(body.get("kind", ""), meta.get("name", ""), meta.get("resourceVersion"), type == "DELETED")


@kopf.on.event("v1", "services", when=_of_adapter)
@kopf.on.event("discovery.k8s.io", "v1", "endpointslices", when=_of_adapter)
def route_changed(namespace: str, body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    adapter = owner(body, "LoRAAdapter")
    meta = body.get("metadata") or {}
    for fleet in memo.runtime.fleets_in(namespace):
        fleet.route_changed(adapter, body.get("kind", ""), meta.get("resourceVersion"), type == "DELETED")
