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

import kopf
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from lorafleet.operator import constants as c

JSON = dict[str, Any]
APPLY_PATCH = "application/apply-patch+yaml"


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


def connection_info(api_client: client.ApiClient) -> kopf.ConnectionInfo:
    """kopf's credentials read off the operator's own client configuration, so the watches and the handlers' calls
    authenticate the same way: with `--kubeconfig`, in-cluster, or from $KUBECONFIG. kopf's built-in login reads
    the kubernetes client's default location, fixed when the client is imported, so a `--kubeconfig` given on the
    command line would otherwise never reach the watches."""
    cfg = api_client.configuration
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0] if parts else None)
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        username=cfg.username or None,
        password=cfg.password or None,
        scheme=scheme,
        token=token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


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

    # --- owned children: server-side apply under one field manager ---
    async def apply(self, body: JSON) -> JSON:
        """Server-side applies `body` as field manager `lorafleet-operator`, forcing conflicts.

        The body is the whole desired state of the fields the operator owns: a field that leaves it is removed from
        the object (we stop managing it), and a field someone else changed is taken back (force). Fields other
        managers own alone (a Deployment's status, defaults) stay theirs.
        """
        ns = body["metadata"].get("namespace")
        name = body["metadata"]["name"]
        patcher = self._patchers()[body["kind"]]
        return await self._call(patcher, name, ns, body, field_manager=c.MANAGER, force=True, _content_type=APPLY_PATCH)

    async def create_once(self, body: JSON) -> tuple[JSON, bool]:
        """Creates `body` unless it exists; never changes an existing object. Returns (object, created)."""
        kind = body["kind"]
        ns = body["metadata"].get("namespace")
        try:
            return await self._call(self._creators()[kind], ns, body), True
        except ApiException as exc:
            if exc.status != 409:
                raise
        return await self.get(kind, ns, body["metadata"]["name"]), False

    def _patchers(self) -> dict[str, Callable[..., Any]]:
        return {
            "Deployment": self.apps.patch_namespaced_deployment,
            "Service": self.core.patch_namespaced_service,
            "PodDisruptionBudget": self.policy.patch_namespaced_pod_disruption_budget,
            "EndpointSlice": self.discovery.patch_namespaced_endpoint_slice,
        }

    def _creators(self) -> dict[str, Callable[..., Any]]:
        return {"Secret": self.core.create_namespaced_secret, "Event": self.core.create_namespaced_event}

    async def record_event(self, body: JSON, delta: int) -> None:
        """Creates the Event, or adds `delta` to the count of the one with the same name (aggregation)."""
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            await self._call(self.core.create_namespaced_event, ns, body)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
        current = await self._call(self.core.read_namespaced_event, name, ns)
        patch = {
            "count": int(current.get("count") or 1) + delta,
            "lastTimestamp": body["lastTimestamp"],
        }
        await self._call(self.core.patch_namespaced_event, name, ns, patch)

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
