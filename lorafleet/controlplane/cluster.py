"""`ControlPlane`: a real Kubernetes control plane on loopback for tests and `lorafleet up`.

etcd + kube-apiserver with TLS from a private CA, RBAC, and service-account signing keys; optionally
kube-controller-manager + kube-scheduler (`controllers=True`) and KWOK with fake GPU nodes (`kwok=True`), so that a
Deployment really yields Running pods with IPs. Every port is a free loopback port, so several control planes can run
side by side. Usage::

    with ControlPlane(controllers=True, kwok=True, kwok_nodes=2) as cp:
        cp.kubectl("get", "nodes")          # KUBECONFIG=cp.kubeconfig is set for you
        cp.request("GET", "/api/v1/namespaces")

`stop()` (also run by `__exit__`, atexit, SIGTERM and SIGHUP) kills every process it started and leaves nothing
listening; a temporary state directory is deleted (unless LORAFLEET_KEEP_CLUSTER_STATE is set, to read the component
logs in `<state_dir>/logs/`), an explicit `state_dir` is kept so the cluster can be restarted with its objects.
Pods annotated `kwok.x-k8s.io/status=custom` are not touched by KWOK: their status (IPs, readiness) is yours to write.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafleet.controlplane.binaries import Binaries, binaries
from lorafleet.controlplane.client import ApiError, HttpsClient
from lorafleet.controlplane.kubeconfig import write_kubeconfig
from lorafleet.controlplane.kwok_stages import kwok_configuration
from lorafleet.controlplane.nodes import KWOK_SELECTOR, POD_CIDR, fake_gpu_node
from lorafleet.controlplane.pki import API_SERVER_SANS, SERVICE_CIDR, CertificateAuthority
from lorafleet.controlplane.processes import ProcessFailed, Supervisor

LOOPBACK = "127.0.0.1"
LOOPBACK_SANS = ("IP:127.0.0.1", "DNS:localhost")


class CommandError(subprocess.CalledProcessError):
    """A kubectl/helm call failed; str() includes its stderr, which is what a test failure needs to show."""

    def __str__(self) -> str:
        return f"{' '.join(map(str, self.cmd))} exited {self.returncode}:\n{self.stderr or ''}{self.stdout or ''}"


def free_port() -> int:
    """A currently free loopback port (the kernel picks it; a rare race with other processes is retried by start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class ControlPlane:
    """A local Kubernetes control plane; see the module docstring. Attributes after `start()`:
    `kubeconfig` (admin, system:masters), `server` (https URL), `ca_cert`, `ports`, `bins`, `state_dir`."""

    def __init__(
        self,
        state_dir: str | Path | None = None,
        *,
        controllers: bool = False,
        kwok: bool = False,
        kwok_nodes: int = 2,
        gpus_per_node: int = 8,
        die_with_parent: bool = True,
        startup_timeout: float = 180.0,
        quiet: bool = False,
    ) -> None:
        self._temporary = state_dir is None
        self.state_dir = Path(tempfile.mkdtemp(prefix="lorafleet-cp-") if state_dir is None else state_dir).resolve()
        self.controllers = controllers
        self.kwok = kwok
        self.kwok_nodes = kwok_nodes
        self.gpus_per_node = gpus_per_node
        self.die_with_parent = die_with_parent
        self.startup_timeout = startup_timeout
        self.quiet = quiet
        self.bins: Binaries = binaries()
        self.pki = CertificateAuthority(self.state_dir / "pki")
        self.ca_cert = self.pki.ca.cert
        self.kubeconfig = self.state_dir / "kubeconfig"
        self.ports: dict[str, int] = {}
        self.server = ""
        self.started_seconds = 0.0
        self._supervisor: Supervisor | None = None
        self._api: HttpsClient | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        """Starts every component and returns once the API server is ready (and, if enabled, controllers have created
        the default service account and every KWOK node is Ready). Retries twice if a port was taken meanwhile."""
        began = time.monotonic()
        for attempt in range(3):
            try:
                self._start_once()
                break
            except ProcessFailed as err:
                self._stop_processes()
                if attempt == 2 or "address already in use" not in str(err):
                    raise
                self._log(f"a port was taken while starting ({err.args[0].splitlines()[0]}); retrying")
        self.started_seconds = time.monotonic() - began
        self._log(f"ready in {self.started_seconds:.1f}s; export KUBECONFIG={self.kubeconfig}")
        return self

    def stop(self) -> None:
        """Kills every process this control plane started; removes the state directory if it was temporary."""
        self._stop_processes()
        if os.environ.get("LORAFLEET_KEEP_CLUSTER_STATE"):
            self._log(f"keeping {self.state_dir} (logs in logs/) because LORAFLEET_KEEP_CLUSTER_STATE is set")
        elif self._temporary and self.state_dir.exists():
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def pids(self) -> dict[str, int]:
        """Live component processes by name (etcd, kube-apiserver, ...)."""
        return self._supervisor.pids() if self._supervisor else {}

    @property
    def running(self) -> bool:
        return bool(self.pids())

    # ---- clients ---------------------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """Environment for tools talking to this cluster (KUBECONFIG set, helm's state kept in the state dir)."""
        helm_home = self.state_dir / "helm"
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "HELM_CACHE_HOME": str(helm_home / "cache"),
            "HELM_CONFIG_HOME": str(helm_home / "config"),
            "HELM_DATA_HOME": str(helm_home / "data"),
        }

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Runs kubectl (the version built with the control plane) against this cluster; raises CommandError."""
        return self._run([str(self.bins.kubectl), *args], input, check, timeout)

    def helm(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300.0
    ) -> subprocess.CompletedProcess[str]:
        """Runs helm against this cluster; raises CommandError."""
        return self._run([str(self.bins.helm), *args], input, check, timeout)

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 30.0, content_type: str = "application/json"
    ) -> Any:
        """One API call as the admin user, e.g. `request("GET", "/api/v1/nodes")`; raises client.ApiError."""
        if self._api is None:
            raise RuntimeError("control plane not started")
        return self._api.request(method, path, body, timeout=timeout, content_type=content_type)

    def _run(self, argv: list[str], input: str | None, check: bool, timeout: float) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(argv, input=input, capture_output=True, text=True, env=self.env(), timeout=timeout)
        if check and result.returncode != 0:
            raise CommandError(result.returncode, argv, result.stdout, result.stderr)
        return result

    # ---- start-up --------------------------------------------------------------------------------------------
    def _log(self, message: str) -> None:
        if not self.quiet:
            print(f"[controlplane {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def _stop_processes(self) -> None:
        if self._supervisor is not None:
            self._supervisor.stop()
            self._supervisor = None
        self._api = None
        state = self.state_dir / "state.json"
        if state.exists():
            state.unlink()

    def _start_once(self) -> None:
        sup = self._supervisor = Supervisor(self.state_dir / "logs", die_with_parent=self.die_with_parent)
        names = ["etcd", "etcd_peer", "apiserver"]
        if self.controllers:
            names += ["controller_manager", "scheduler"]
        if self.kwok:
            names += ["kwok"]
        self.ports = {name: free_port() for name in names}
        self.server = f"https://{LOOPBACK}:{self.ports['apiserver']}"
        admin = self.pki.issue("admin", "lorafleet-admin", ("system:masters",))
        self._api = HttpsClient(self.server, self.ca_cert, admin)
        write_kubeconfig(self.kubeconfig, self.server, self.ca_cert, admin, "lorafleet-admin")

        self._start_etcd(sup)
        self._start_apiserver(sup)
        if self.controllers:
            self._start_controllers(sup)
        if self.kwok:
            self._start_kwok(sup)
        (self.state_dir / "state.json").write_text(
            json.dumps(
                {"server": self.server, "kubeconfig": str(self.kubeconfig), "ports": self.ports, "pids": sup.pids()},
                indent=2,
            )
        )
        if self.controllers:
            self._wait(
                "kube-controller-manager created the default service account",
                ["kube-controller-manager"],
                self._has_default_sa,
            )
        if self.kwok and self.kwok_nodes:
            self.ensure_kwok_nodes(self.kwok_nodes)

    def _wait(self, what: str, names: list[str], ready: Callable[[], bool]) -> None:
        """Polls `ready` until it holds, failing fast with the log tail if one of `names` exits meanwhile."""
        assert self._supervisor is not None
        began = time.monotonic()
        last_note = began
        while not ready():
            for name in names:
                self._supervisor.check_alive(name)
            now = time.monotonic()
            if now - began > self.startup_timeout:
                tails = "\n".join(f"--- {n}:\n{self._supervisor.log_tail(n)}" for n in names)
                raise TimeoutError(f"timed out after {self.startup_timeout:.0f}s waiting for {what}\n{tails}")
            if now - last_note >= 5:
                self._log(f"still waiting for {what} ({now - began:.0f}s)")
                last_note = now
            time.sleep(0.2)
        self._log(f"{what} ({time.monotonic() - began:.1f}s)")

    def _start_etcd(self, sup: Supervisor) -> None:
        cert = self.pki.issue("etcd", "etcd", sans=LOOPBACK_SANS)
        client_url = f"https://{LOOPBACK}:{self.ports['etcd']}"
        peer_url = f"http://{LOOPBACK}:{self.ports['etcd_peer']}"
        argv = [
            str(self.bins.etcd), "--name=lorafleet", f"--data-dir={self.state_dir / 'etcd'}",
            f"--listen-client-urls={client_url}", f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=lorafleet={peer_url}", "--initial-cluster-state=new",
            f"--cert-file={cert.cert}", f"--key-file={cert.key}", f"--trusted-ca-file={self.ca_cert}",
            "--client-cert-auth", "--log-level=warn", "--listen-metrics-urls=",
        ]  # fmt: skip
        if self._temporary:
            argv.append(
                "--unsafe-no-fsync"
            )  # a throw-away test cluster needs no durability; fsync dominates on CI disks
        sup.spawn("etcd", argv)
        client = HttpsClient(client_url, self.ca_cert, self.pki.issue("etcd-client", "kube-apiserver-etcd-client"))

        def healthy() -> bool:
            try:
                return client.request("GET", "/health", timeout=2).get("health") == "true"
            except (OSError, ApiError, AttributeError):
                return False

        self._wait("etcd healthy", ["etcd"], healthy)

    def _start_apiserver(self, sup: Supervisor) -> None:
        serving = self.pki.issue("apiserver", "kube-apiserver", sans=API_SERVER_SANS)
        etcd_client = self.pki.issue("etcd-client", "kube-apiserver-etcd-client")
        sa = self.pki.service_account_keys()
        argv = [
            str(self.bins.kube_apiserver),
            f"--etcd-servers=https://{LOOPBACK}:{self.ports['etcd']}",
            f"--etcd-cafile={self.ca_cert}", f"--etcd-certfile={etcd_client.cert}", f"--etcd-keyfile={etcd_client.key}",
            f"--bind-address={LOOPBACK}", f"--advertise-address={LOOPBACK}", f"--secure-port={self.ports['apiserver']}",
            f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}", f"--client-ca-file={self.ca_cert}",
            "--authorization-mode=Node,RBAC", "--endpoint-reconciler-type=none", "--allow-privileged=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={sa.cert}", f"--service-account-signing-key-file={sa.key}",
            f"--cert-dir={self.state_dir / 'apiserver'}", "--profiling=false",
        ]  # fmt: skip
        sup.spawn("kube-apiserver", argv)
        assert self._api is not None
        api = self._api
        self._wait(
            f"kube-apiserver /readyz on {self.server}", ["etcd", "kube-apiserver"], lambda: api.healthy("/readyz")
        )

    def _component_kubeconfig(self, name: str, user: str) -> tuple[Path, list[str]]:
        pair = self.pki.issue(name, user, sans=LOOPBACK_SANS)
        path = write_kubeconfig(self.state_dir / f"{name}.kubeconfig", self.server, self.ca_cert, pair, user)
        serving = [
            f"--kubeconfig={path}", f"--authentication-kubeconfig={path}", f"--authorization-kubeconfig={path}",
            f"--bind-address={LOOPBACK}", f"--tls-cert-file={pair.cert}", f"--tls-private-key-file={pair.key}",
            f"--client-ca-file={self.ca_cert}", "--leader-elect=false",
        ]  # fmt: skip
        return path, serving

    def _start_controllers(self, sup: Supervisor) -> None:
        _, kcm_common = self._component_kubeconfig("controller-manager", "system:kube-controller-manager")
        sa = self.pki.service_account_keys()
        sup.spawn("kube-controller-manager", [
            str(self.bins.kube_controller_manager), *kcm_common, f"--secure-port={self.ports['controller_manager']}",
            f"--root-ca-file={self.ca_cert}", f"--service-account-private-key-file={sa.key}",
            f"--cluster-signing-cert-file={self.ca_cert}", f"--cluster-signing-key-file={self.pki.ca.key}",
            "--use-service-account-credentials=true", f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--cluster-name=lorafleet", "--allocate-node-cidrs=false",
            # No cloud provider and no routes: the cloud controllers would only log errors.
            "--controllers=*,-cloud-node-lifecycle-controller,-node-route-controller,-service-lb-controller",
        ])  # fmt: skip
        _, sched_common = self._component_kubeconfig("scheduler", "system:kube-scheduler")
        sup.spawn(
            "kube-scheduler", [str(self.bins.kube_scheduler), *sched_common, f"--secure-port={self.ports['scheduler']}"]
        )
        for name, port in (("kube-controller-manager", "controller_manager"), ("kube-scheduler", "scheduler")):
            client = HttpsClient(f"https://{LOOPBACK}:{self.ports[port]}", self.ca_cert)
            self._wait(f"{name} /healthz", [name], lambda c=client: c.healthy("/healthz"))  # type: ignore[misc]

    def _start_kwok(self, sup: Supervisor) -> None:
        config = self.state_dir / "kwok.yaml"
        config.write_text(kwok_configuration(POD_CIDR))
        sup.spawn("kwok", [
            str(self.bins.kwok), f"--kubeconfig={self.kubeconfig}", f"--config={config}",
            "--manage-all-nodes=false", f"--manage-nodes-with-annotation-selector={KWOK_SELECTOR}",
            f"--server-address={LOOPBACK}:{self.ports['kwok']}",
        ])  # fmt: skip

    def _has_default_sa(self) -> bool:
        try:
            self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default", timeout=5)
            return True
        except (ApiError, OSError):
            return False

    def add_kwok_nodes(self, count: int) -> list[str]:
        """Creates `count` more fake GPU nodes (capacity `nvidia.com/gpu`) and waits until KWOK reports them Ready."""
        existing = self._kwok_node_names()
        first = max((int(n.rsplit("-", 1)[1]) for n in existing), default=-1) + 1
        return self._create_kwok_nodes(range(first, first + count))

    def ensure_kwok_nodes(self, count: int) -> list[str]:
        """Makes sure nodes kwok-gpu-0..count-1 exist (a restart on a kept state dir reuses them) and are Ready."""
        return self._create_kwok_nodes(range(count))

    def _kwok_node_names(self) -> set[str]:
        return {n["metadata"]["name"] for n in self.request("GET", "/api/v1/nodes?labelSelector=type%3Dkwok")["items"]}

    def _create_kwok_nodes(self, indices: range) -> list[str]:
        if not self.kwok:
            raise RuntimeError("KWOK nodes need ControlPlane(kwok=True)")
        existing = self._kwok_node_names()
        names = []
        for index in indices:
            node = fake_gpu_node(index, gpus=self.gpus_per_node)
            name = node["metadata"]["name"]
            if name not in existing:
                self.request("POST", "/api/v1/nodes", node)
            names.append(name)

        def all_ready() -> bool:
            for name in names:
                conditions = self.request("GET", f"/api/v1/nodes/{name}").get("status", {}).get("conditions") or []
                if not any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                    return False
            return True

        self._wait(f"{len(names)} KWOK GPU node(s) Ready", ["kwok"], all_ready)
        return names
