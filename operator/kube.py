"""A small async facade over the official `kubernetes` client that speaks plain dicts.

The official client is synchronous; every call runs in a worker thread so the kopf event loop never blocks.
Responses are decoded from raw JSON (`_preload_content=False`) so the rest of the operator handles the same dict
shapes it builds in `resources.py`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from lorafleet.operator import constants as c

JSON = dict[str, Any]


def load_config(kubeconfig: str | None = None) -> client.ApiClient:
    """kubeconfig from the argument, $KUBECONFIG or ~/.kube/config; in-cluster config when running in a pod."""
    cfg = client.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if path or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_kube_config(config_file=path, client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    cfg.connection_pool_maxsize = 16
    return client.ApiClient(cfg)


def not_found(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 404


def conflict(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 409


class Kube:
    """Dict-in, dict-out async calls for the handful of APIs the operator and the local shim use."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.policy = client.PolicyV1Api(api_client)
        self.discovery = client.DiscoveryV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> JSON:
        def run() -> JSON:
            resp = fn(*args, _preload_content=False, **kwargs)
            data = resp.data
            return json.loads(data) if data else {}

        return await asyncio.to_thread(run)

    # --- generic create-or-patch for owned children ---
    async def apply(self, body: JSON, *, patch: bool = True) -> JSON:
        """Creates `body`; if it exists, merge-patches it (or leaves it alone when `patch` is False)."""
        kind = body["kind"]
        ns = body["metadata"].get("namespace")
        name = body["metadata"]["name"]
        create, patcher = self._verbs(kind)
        try:
            return await self._call(create, ns, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
        if not patch:
            return await self.get(kind, ns, name)
        return await self._call(patcher, name, ns, body)

    def _verbs(self, kind: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
        table = {
            "Deployment": (self.apps.create_namespaced_deployment, self.apps.patch_namespaced_deployment),
            "Service": (self.core.create_namespaced_service, self.core.patch_namespaced_service),
            "Secret": (self.core.create_namespaced_secret, self.core.patch_namespaced_secret),
            "PodDisruptionBudget": (
                self.policy.create_namespaced_pod_disruption_budget,
                self.policy.patch_namespaced_pod_disruption_budget,
            ),
            "EndpointSlice": (
                self.discovery.create_namespaced_endpoint_slice,
                self.discovery.patch_namespaced_endpoint_slice,
            ),
        }
        return table[kind]

    async def get(self, kind: str, ns: str, name: str) -> JSON:
        getter = {
            "Deployment": self.apps.read_namespaced_deployment,
            "Service": self.core.read_namespaced_service,
            "Secret": self.core.read_namespaced_secret,
            "PodDisruptionBudget": self.policy.read_namespaced_pod_disruption_budget,
            "EndpointSlice": self.discovery.read_namespaced_endpoint_slice,
            "Pod": self.core.read_namespaced_pod,
        }[kind]
        return await self._call(getter, name, ns)

    async def get_or_none(self, kind: str, ns: str, name: str) -> JSON | None:
        try:
            return await self.get(kind, ns, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def delete(self, kind: str, ns: str, name: str) -> None:
        deleter = {
            "Service": self.core.delete_namespaced_service,
            "EndpointSlice": self.discovery.delete_namespaced_endpoint_slice,
            "Pod": self.core.delete_namespaced_pod,
        }[kind]
        try:
            await self._call(deleter, name, ns)
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def replace_endpointslice(self, body: JSON) -> JSON:
        """Writes the whole slice (endpoints is a list: a merge patch would not remove stale entries safely)."""
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            return await self._call(self.discovery.create_namespaced_endpoint_slice, ns, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
        for _ in range(5):
            current = await self.get("EndpointSlice", ns, name)
            new = dict(body)
            new["metadata"] = dict(body["metadata"], resourceVersion=current["metadata"]["resourceVersion"])
            try:
                return await self._call(self.discovery.replace_namespaced_endpoint_slice, name, ns, new)
            except ApiException as exc:
                if exc.status != 409:
                    raise
        raise RuntimeError(f"could not replace EndpointSlice {ns}/{name}: conflicts")

    async def list_pods(self, ns: str, selector: str) -> list[JSON]:
        return (await self._call(self.core.list_namespaced_pod, ns, label_selector=selector)).get("items", [])

    async def patch_pod_annotations(self, ns: str, name: str, annotations: dict[str, str | None]) -> JSON:
        return await self._call(self.core.patch_namespaced_pod, name, ns, {"metadata": {"annotations": annotations}})

    async def read_secret_value(self, ns: str, name: str, key: str) -> str | None:
        import base64

        secret = await self.get_or_none("Secret", ns, name)
        if not secret or key not in (secret.get("data") or {}):
            return None
        return base64.b64decode(secret["data"][key]).decode()

    # --- our custom resources ---
    async def get_cr(self, plural: str, ns: str, name: str) -> JSON | None:
        try:
            return await self._call(self.custom.get_namespaced_custom_object, c.GROUP, c.VERSION, ns, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def list_cr(self, plural: str, ns: str) -> list[JSON]:
        res = await self._call(self.custom.list_namespaced_custom_object, c.GROUP, c.VERSION, ns, plural)
        return res.get("items", [])

    async def patch_cr(self, plural: str, ns: str, name: str, body: JSON) -> JSON | None:
        try:
            return await self._call(
                self.custom.patch_namespaced_custom_object, c.GROUP, c.VERSION, ns, plural, name, body
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def patch_status(self, plural: str, ns: str, name: str, status: JSON) -> JSON | None:
        try:
            return await self._call(
                self.custom.patch_namespaced_custom_object_status,
                c.GROUP,
                c.VERSION,
                ns,
                plural,
                name,
                {"status": status},
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
