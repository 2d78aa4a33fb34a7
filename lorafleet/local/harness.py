"""A local fleet driver shared by `lorafleet up`, the operator tests and `bench/operator_local.py`.

It owns three things on top of a running control plane: the kubelet shim (real worker processes behind KWOK pods),
the operator (a real `lorafleet operator` subprocess, so a restart is a real restart), and a tiny client that routes
the way any gateway would: read the adapter's EndpointSlice, map each pod to its local endpoint (docs/local-mode.md)
and send OpenAI requests there.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from lorafleet.operator import constants as c
from lorafleet.operator import resources as res

T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(fn: Callable[[], T], timeout: float, interval: float = 0.1, desc: str = "condition") -> T:
    """Polls `fn` until it returns something truthy; raises TimeoutError with the last value/exception."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = fn()
            if value:
                return value
            last = value
        except Exception as exc:  # noqa: BLE001 - keep polling; report at the end
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {desc}; last: {last!r}")
        time.sleep(interval)


class LocalFleet:
    def __init__(
        self,
        kubeconfig: str | Path,
        namespace: str,
        state_dir: str | Path,
        *,
        adapter_root: str | None = None,
        operator_args: list[str] | None = None,
        worker_extra_args: list[str] | None = None,
        operator_kubeconfig: str | Path | None = None,
    ) -> None:
        from kubernetes import client

        from lorafleet.operator.kube import load_config

        self.kubeconfig = str(kubeconfig)
        # The operator may run with its own (least-privilege) credentials; the shim and the test client are admin.
        self.operator_kubeconfig = str(operator_kubeconfig or kubeconfig)
        self.namespace = namespace
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.adapter_root = adapter_root
        self.operator_args = operator_args or []
        self.worker_extra_args = worker_extra_args or []
        api = load_config(self.kubeconfig)
        self.core = client.CoreV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.apps = client.AppsV1Api(api)
        self.policy = client.PolicyV1Api(api)
        self.http = httpx.Client(timeout=60.0)
        self.shim: Any = None
        self.operator: subprocess.Popen[bytes] | None = None
        self.operator_metrics_port = 0
        self.operator_starts = 0

    # ---------------------------------------------------------------- processes
    def ensure_namespace(self) -> None:
        from kubernetes.client.rest import ApiException

        try:
            self.core.create_namespace({"metadata": {"name": self.namespace}})
        except ApiException as exc:
            if exc.status != 409:
                raise

    def start_shim(self, **kwargs: Any) -> None:
        from lorafleet.local.shim import KubeletShim

        self.shim = KubeletShim(
            [self.namespace],
            kubeconfig=self.kubeconfig,
            state_dir=self.state_dir / "workers",
            adapter_root=self.adapter_root,
            extra_args=self.worker_extra_args,
            **kwargs,
        ).start()

    def start_operator(self, peering: list[str] | None = None) -> subprocess.Popen[bytes]:
        """Starts `lorafleet operator` (standalone unless `peering` flags are given, e.g. ["--peering", "x"])."""
        self.operator_metrics_port = free_port()
        argv = [
            sys.executable,
            "-m",
            "lorafleet.cli",
            "operator",
            *(peering or ["--standalone"]),
            "--local-endpoints",
            "-n",
            self.namespace,
            "--metrics-port",
            str(self.operator_metrics_port),
            "--liveness-port",
            "0",
            "--kubeconfig",
            self.operator_kubeconfig,
            *self.operator_args,
        ]
        self.operator_starts += 1
        log = open(self.state_dir / f"operator-{self.operator_starts}.log", "wb")  # noqa: SIM115
        # the credentials come from --kubeconfig alone, as a pod's command line gives them: no $KUBECONFIG
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"} | {"PYTHONUNBUFFERED": "1"}
        self.operator = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        return self.operator

    def stop_operator(self, timeout: float = 15.0) -> None:
        proc, self.operator = self.operator, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def operator_log(self) -> str:
        path = self.state_dir / f"operator-{self.operator_starts}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def operator_metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        text = self.http.get(f"http://127.0.0.1:{self.operator_metrics_port}/metrics", timeout=5).text
        total = 0.0
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                    total += s.value
        return total

    def close(self) -> None:
        self.stop_operator()
        if self.shim is not None:
            self.shim.stop()
            self.shim = None
        self.http.close()

    # ---------------------------------------------------------------- custom resources
    def create(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        body = {**body, "metadata": {**body["metadata"], "namespace": self.namespace}}
        return self.custom.create_namespaced_custom_object(c.GROUP, c.VERSION, self.namespace, plural, body)

    def patch(self, plural: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(c.GROUP, c.VERSION, self.namespace, plural, name, body)

    def get(self, plural: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        try:
            return self.custom.get_namespaced_custom_object(c.GROUP, c.VERSION, self.namespace, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, plural: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(c.GROUP, c.VERSION, self.namespace, plural, name)

    def condition(self, plural: str, name: str, type_: str) -> dict[str, Any] | None:
        obj = self.get(plural, name) or {}
        for cond in (obj.get("status") or {}).get("conditions") or []:
            if cond.get("type") == type_:
                return cond
        return None

    def events_for(self, name: str) -> list[Any]:
        evs = self.core.list_namespaced_event(self.namespace, field_selector=f"involvedObject.name={name}").items
        return list(evs)

    # ---------------------------------------------------------------- pods, routing, requests
    def worker_pods(self, basemodel: str) -> list[Any]:
        sel = res.selector_string(res.worker_selector(basemodel))
        return [
            p
            for p in self.core.list_namespaced_pod(self.namespace, label_selector=sel).items
            if not p.metadata.deletion_timestamp
        ]

    def pod_endpoints(self, *, terminating: bool = False) -> dict[str, str]:
        """Pod -> local endpoint of every worker pod; with `terminating`, also of pods being deleted (their process
        runs until its preStop drain ends, so a gateway still reaches them while the slice lists them)."""
        out = {}
        for p in self.core.list_namespaced_pod(self.namespace, label_selector=f"{c.LABEL_COMPONENT}=worker").items:
            ep = (p.metadata.annotations or {}).get(c.ANNOT_LOCAL_ENDPOINT)
            if ep and (terminating or not p.metadata.deletion_timestamp):
                out[p.metadata.name] = ep
        return out

    def slice_pods(self, adapter: str) -> list[str] | None:
        from kubernetes.client.rest import ApiException

        try:
            sl = self.discovery.read_namespaced_endpoint_slice(res.adapter_route_name(adapter), self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return sorted(ep.target_ref.name for ep in sl.endpoints or [] if ep.target_ref and ep.conditions.ready)

    def routes(self, adapter: str) -> list[tuple[str, str]]:
        """(pod, local endpoint) for every pod the adapter's EndpointSlice lists."""
        pods = self.slice_pods(adapter) or []
        eps = self.pod_endpoints(terminating=True)
        return [(p, eps[p]) for p in pods if p in eps]

    def serves(self, adapter: str) -> bool:
        """The adapter is routed and a completion through every routed pod succeeds."""
        routes = self.routes(adapter)
        return bool(routes) and all(self.complete(adapter, ep).status_code == 200 for _, ep in routes)

    def complete(
        self, adapter: str, endpoint: str | None = None, prompt: str = "the fleet", max_tokens: int = 4
    ) -> httpx.Response:
        if endpoint is None:
            routes = self.routes(adapter)
            if not routes:
                raise RuntimeError(f"adapter {adapter} has no route")
            endpoint = routes[0][1]
        body = {"model": adapter, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        return self.http.post(f"http://{endpoint}/v1/completions", json=body)

    def admin_token(self, basemodel: str) -> str:
        import base64

        sec = self.core.read_namespaced_secret(res.admin_secret_name(basemodel), self.namespace)
        return base64.b64decode(sec.data[c.ADMIN_TOKEN_KEY]).decode()

    def worker_adapters(self, endpoint: str, token: str | None = None) -> dict[str, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = self.http.get(f"http://{endpoint}/v1/adapters", headers=headers, timeout=10).json()
        return {a["name"]: a for a in data.get("data", [])}

    def worker_api_loads(self, endpoint: str) -> float:
        from lorafleet.operator.scrape import parse_metrics

        return parse_metrics(self.http.get(f"http://{endpoint}/metrics", timeout=10).text).loads_total


class StreamingRouter:
    """Sends a steady stream of requests for one adapter the way a gateway would: it re-reads the adapter's
    EndpointSlice every `refresh` seconds and round-robins over the pods listed there. Counts every outcome.
    `pause` (s) waits after each request in each sender, for a stream of a known low rate."""

    def __init__(
        self, fleet: LocalFleet, adapter: str, *, refresh: float = 0.05, concurrency: int = 2, pause: float = 0.0
    ) -> None:
        self.fleet = fleet
        self.adapter = adapter
        self.refresh = refresh
        self.concurrency = concurrency
        self.pause = pause
        self.ok = 0
        self.failed: list[str] = []
        self.served_by: dict[str, int] = {}
        self._routes: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._rr = itertools.count()

    def __enter__(self) -> StreamingRouter:
        self._routes = self.fleet.routes(self.adapter)
        self._threads = [threading.Thread(target=self._watch, daemon=True)]
        self._threads += [threading.Thread(target=self._send, daemon=True) for _ in range(self.concurrency)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self._routes = self.fleet.routes(self.adapter)
            except Exception:  # noqa: BLE001 - API hiccup: keep the last routing table, like a gateway would
                pass
            self._stop.wait(self.refresh)

    def _send(self) -> None:
        client = httpx.Client(timeout=60.0)
        try:
            while not self._stop.is_set():
                routes = list(self._routes)
                if not routes:
                    self.failed.append("no route")
                    self._stop.wait(0.05)
                    continue
                pod, ep = routes[next(self._rr) % len(routes)]
                body = {"model": self.adapter, "prompt": "the fleet", "max_tokens": 4, "temperature": 0}
                try:
                    r = client.post(f"http://{ep}/v1/completions", json=body)
                    if r.status_code == 200:
                        self.ok += 1
                        self.served_by[pod] = self.served_by.get(pod, 0) + 1
                    else:
                        self.failed.append(f"{pod}: HTTP {r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failed.append(f"{pod}: {type(exc).__name__} {exc}")
                if self.pause:
                    self._stop.wait(self.pause)
        finally:
            client.close()


def wait_namespace_not_terminating(core: Any, namespace: str, timeout: float = 120.0) -> None:
    """A namespace that an earlier user deleted refuses new objects until the namespace controller has emptied it;
    wait for it to disappear instead of failing with 403 NamespaceTerminating."""
    from kubernetes.client.rest import ApiException

    deadline = time.monotonic() + timeout
    while True:
        try:
            ns = core.read_namespace(namespace)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        if ns.status is None or ns.status.phase != "Terminating":
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"namespace {namespace} still terminating after {timeout:.0f}s")
        time.sleep(0.5)


def service_account_kubeconfig(
    admin_kubeconfig: str | Path,
    out: str | Path,
    manifests: str | Path,
    *,
    namespace: str = "lorafleet-system",
    name: str = "lorafleet-operator",
) -> Path:
    """Applies the operator's ServiceAccount + least-privilege ClusterRole/Binding from `manifests/` and writes a
    kubeconfig that authenticates as that ServiceAccount (TokenRequest), so the operator runs with exactly the RBAC
    a real install grants it and a missing rule fails loudly."""
    import json

    import yaml
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    from lorafleet.operator.kube import load_config

    api = load_config(str(admin_kubeconfig))
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    mdir = Path(manifests)

    def load(file: str) -> dict[str, Any]:
        return yaml.safe_load((mdir / file).read_text())

    def ensure(fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except ApiException as exc:
            if exc.status != 409:
                raise

    wait_namespace_not_terminating(core, namespace)
    ensure(core.create_namespace, {"metadata": {"name": namespace}})
    sa = load("serviceaccount.yaml")
    ensure(
        core.create_namespaced_service_account,
        namespace,
        {**sa, "metadata": {**sa["metadata"], "namespace": namespace}},
    )
    role = load("clusterrole.yaml")
    try:
        rbac.create_cluster_role(role)
    except ApiException as exc:
        if exc.status != 409:
            raise
        rbac.replace_cluster_role(role["metadata"]["name"], role)
    ensure(rbac.create_cluster_role_binding, load("clusterrolebinding.yaml"))
    token = core.create_namespaced_service_account_token(name, namespace, {"spec": {"expirationSeconds": 86400}})
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())  # JSON is YAML
    cluster = admin["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": name, "user": {"token": token.status.token}}],
        "contexts": [{"name": "operator", "context": {"cluster": cluster["name"], "user": name}}],
        "current-context": "operator",
    }
    path = Path(out)
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
    return path
