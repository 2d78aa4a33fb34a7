"""A local "kubelet": for every Running worker pod on a KWOK node, run a REAL `lorafleet worker` process.

KWOK makes pods Running with IPs from a fake pod CIDR, but nothing runs and those IPs are unreachable. The shim
starts the pod's own container arguments as a local process on a free 127.0.0.1 port (the admin token is read from
the pod's Secret volume source and written to a private file) and, once the worker answers `/health`, annotates the
pod `lorafleet.io/local-endpoint: 127.0.0.1:PORT`. The operator (with `--local-endpoints`) talks to that address;
EndpointSlices keep the pod IPs, since the API server rejects loopback addresses. Like a kubelet with
`restartPolicy: Always`, a crashed worker is restarted (on a new port) and the pod re-annotated. A deleted pod's
process is stopped the way a kubelet stops a container: after its preStop drain (`lorafleet drain-wait`: until the
operator has emptied the worker, at most the pod's grace period; none for a grace period of 0). The shim holds each
pod it runs with a finalizer until then, so KWOK cannot remove the pod object while its process still serves. See
docs/local-mode.md.
"""

from __future__ import annotations

import base64
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.operator import constants as c

log = logging.getLogger(__name__)

WORKER_SELECTOR = f"{c.LABEL_COMPONENT}={c.COMPONENT_WORKER},{c.LABEL_BASEMODEL}"
FINALIZER = "lorafleet.io/local-kubelet"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _set_flag(args: list[str], flag: str, value: str | None) -> list[str]:
    """Replaces (or appends, or with value None removes) `flag VALUE` in an argv list."""
    out: list[str] = []
    skip = False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a == flag:
            skip = i + 1 < len(args)
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    if value is not None:
        out += [flag, value]
    return out


@dataclass
class WorkerProcess:
    pod: str
    namespace: str
    uid: str
    argv: list[str]
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    annotated: bool = False
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0
    stopping: bool = False
    token: str | None = None


class KubeletShim:
    """Runs in a background thread; `stop()` terminates every process it started (and only those)."""

    def __init__(
        self,
        namespaces: list[str],
        *,
        kubeconfig: str | None = None,
        state_dir: str | Path | None = None,
        worker_cmd: list[str] | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        poll: float = 0.25,
        adapter_root: str | None = None,
    ) -> None:
        from kubernetes import client

        from lorafleet.operator.kube import load_config

        self.namespaces = namespaces
        self.api = client.CoreV1Api(load_config(kubeconfig))
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="lorafleet-shim-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.worker_cmd = worker_cmd or [sys.executable, "-m", "lorafleet.cli", "worker"]
        self.extra_args = extra_args or []
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
        self.poll = poll
        self.adapter_root = adapter_root
        self.procs: dict[str, WorkerProcess] = {}  # by pod uid
        self._tokens: dict[str, str] = {}  # pod uid -> admin token (the drain wait reads /v1/adapters with it)
        self.started_total = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> KubeletShim:
        self._thread = threading.Thread(target=self._loop, name="kubelet-shim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        with self._lock:
            procs = list(self.procs.values())
            self.procs.clear()
        for wp in procs:
            self._terminate(wp)
            self._release_finalizer(wp.namespace, wp.pod)

    def _release_finalizer(self, ns: str, pod: str) -> None:
        """At shutdown: no process runs any more, so nothing may hold the pod objects (a namespace must delete)."""
        try:
            self._drop_finalizer(ns, pod)
        except Exception as exc:  # noqa: BLE001 - the API server may already be gone
            log.debug("finalizer of %s not released: %s", pod, exc)

    def __enter__(self) -> KubeletShim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def endpoint_of(self, pod: str) -> str | None:
        with self._lock:
            for wp in self.procs.values():
                if wp.pod == pod and wp.annotated:
                    return f"127.0.0.1:{wp.port}"
        return None

    def kill_worker(self, pod: str) -> bool:
        """Simulates a container crash (SIGKILL); the shim restarts it like a kubelet would."""
        with self._lock:
            for wp in self.procs.values():
                if wp.pod == pod:
                    wp.proc.kill()
                    return True
        return False

    # ---------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception:  # the API server may be restarting; keep going
                log.exception("kubelet shim sync failed")
            self._stop.wait(self.poll)

    def _list_pods(self) -> list[Any]:
        pods: list[Any] = []
        for ns in self.namespaces:
            pods += self.api.list_namespaced_pod(ns, label_selector=WORKER_SELECTOR).items
        return pods

    def sync_once(self) -> None:
        pods = self._list_pods()
        seen: set[str] = set()
        for pod in pods:
            uid = pod.metadata.uid
            if pod.metadata.deletion_timestamp:
                seen.add(uid)
                self._stopping(pod)
                continue
            running = pod.status.phase == "Running" and pod.status.pod_ip
            if not running:
                continue
            seen.add(uid)
            with self._lock:
                wp = self.procs.get(uid)
            if wp is None:
                self._start(pod)
                continue
            if wp.proc.poll() is not None:
                log.warning("worker for pod %s exited with %s; restarting", wp.pod, wp.proc.returncode)
                self._restart(wp, pod)
                continue
            if not wp.annotated and self._healthy(wp.port):
                self._annotate(wp.namespace, wp.pod, f"127.0.0.1:{wp.port}")
                wp.annotated = True
        with self._lock:
            gone = [uid for uid in self.procs if uid not in seen and not self.procs[uid].stopping]
            for uid in gone:
                self._terminate(self.procs.pop(uid))

    def _stopping(self, pod: Any) -> None:
        """A pod being deleted: drain-wait (in the background), stop the process, release the pod object."""
        with self._lock:
            wp = self.procs.get(pod.metadata.uid)
            if wp is not None and wp.stopping:
                return
            if wp is not None:
                wp.stopping = True
        if wp is None:
            if FINALIZER in (pod.metadata.finalizers or []):
                self._release(pod.metadata.namespace, pod.metadata.name)
            return
        grace = pod.metadata.deletion_grace_period_seconds or 0
        threading.Thread(target=self._graceful_stop, args=(wp, grace), daemon=True).start()

    def _graceful_stop(self, wp: WorkerProcess, grace: float) -> None:
        from lorafleet.prestop import wait_drained

        if grace > 0 and wp.proc.poll() is None:
            wait_drained(wp.port, wp.token, timeout=max(grace - 2.0, 0.0))
        self._terminate(wp)
        with self._lock:
            self.procs.pop(wp.uid, None)
        self._release(wp.namespace, wp.pod)

    def _release(self, ns: str, pod: str) -> None:
        """Drops the finalizer and removes the pod object, as a kubelet does once the containers stopped."""
        from kubernetes.client.rest import ApiException

        try:
            self._drop_finalizer(ns, pod)
            self.api.delete_namespaced_pod(pod, ns, grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("releasing pod %s failed: %s", pod, exc)

    def _drop_finalizer(self, ns: str, pod: str) -> None:
        current = self.api.read_namespaced_pod(pod, ns)
        keep = [f for f in current.metadata.finalizers or [] if f != FINALIZER]
        self.api.patch_namespaced_pod(pod, ns, [{"op": "replace", "path": "/metadata/finalizers", "value": keep}])

    # ---------------------------------------------------------------- helpers
    def _argv(self, pod: Any, port: int) -> list[str]:
        container = pod.spec.containers[0]
        args = list(container.args or [])
        args = _set_flag(args, "--port", str(port))
        args = _set_flag(args, "--host", "127.0.0.1")
        token_file = self._token_file(pod)
        args = _set_flag(args, "--admin-token-file", token_file)
        if self.adapter_root:
            args = _set_flag(args, "--adapter-root", self.adapter_root)
        if "--claim-root" in args:
            args = _set_flag(args, "--claim-root", str(self._claim_root(pod)))
        if "--source-cache" in args:
            args = _set_flag(args, "--source-cache", str(self.state_dir / "source-cache"))
        return [*self.worker_cmd, *args, *self.extra_args]

    def _claim_root(self, pod: Any) -> Path:
        """A directory with one link per claim the pod mounts, to the directory of the volume bound to it (a
        hostPath or local PersistentVolume): what the kubelet's read-only claim mounts are to a real pod."""
        root = self.state_dir / "claims" / pod.metadata.uid
        root.mkdir(parents=True, exist_ok=True)
        for vol in pod.spec.volumes or []:
            pvc = vol.persistent_volume_claim
            if pvc is None:
                continue
            claim = self.api.read_namespaced_persistent_volume_claim(pvc.claim_name, pod.metadata.namespace)
            if not claim.spec.volume_name:
                continue
            pv = self.api.read_persistent_volume(claim.spec.volume_name)
            src = (pv.spec.host_path and pv.spec.host_path.path) or (pv.spec.local and pv.spec.local.path)
            link = root / pvc.claim_name
            if src and not link.is_symlink():
                link.symlink_to(src)
        return root

    @staticmethod
    def _downward_env(pod: Any) -> dict[str, str]:
        """The container's downward-API env entries the kubelet would fill (metadata.name/namespace/uid)."""
        fields = {
            "metadata.name": pod.metadata.name,
            "metadata.namespace": pod.metadata.namespace,
            "metadata.uid": pod.metadata.uid,
        }
        out = {}
        for e in pod.spec.containers[0].env or []:
            ref = e.value_from.field_ref if e.value_from is not None else None
            if ref is not None and ref.field_path in fields:
                out[e.name] = str(fields[ref.field_path])
        return out

    def _token_file(self, pod: Any) -> str | None:
        for vol in pod.spec.volumes or []:
            if vol.secret is not None and vol.name == "admin-token":
                secret = self.api.read_namespaced_secret(vol.secret.secret_name, pod.metadata.namespace)
                token = base64.b64decode(secret.data[c.ADMIN_TOKEN_KEY]).decode()
                self._tokens[pod.metadata.uid] = token
                path = self.state_dir / f"{pod.metadata.uid}.token"
                path.write_text(token)
                path.chmod(0o600)
                return str(path)
        return None

    def _spawn(self, pod: Any) -> tuple[int, list[str], subprocess.Popen[bytes], Path]:
        port = free_port()
        argv = self._argv(pod, port)
        log_path = self.state_dir / f"{pod.metadata.name}.log"
        with open(log_path, "ab") as fh:
            env = {**self.env, **self._downward_env(pod)}
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.started_total += 1
        log.info("started worker for pod %s on 127.0.0.1:%d (pid %d)", pod.metadata.name, port, proc.pid)
        return port, argv, proc, log_path

    def _start(self, pod: Any) -> None:
        self._hold(pod)
        port, argv, proc, log_path = self._spawn(pod)
        wp = WorkerProcess(pod.metadata.name, pod.metadata.namespace, pod.metadata.uid, argv, port, proc, log_path)
        wp.token = self._tokens.get(pod.metadata.uid)
        with self._lock:
            self.procs[pod.metadata.uid] = wp

    def _hold(self, pod: Any) -> None:
        """Adds the finalizer that keeps the pod object until its process has stopped."""
        if FINALIZER in (pod.metadata.finalizers or []):
            return
        self.api.patch_namespaced_pod(
            pod.metadata.name, pod.metadata.namespace, {"metadata": {"finalizers": [FINALIZER]}}
        )

    def _restart(self, wp: WorkerProcess, pod: Any) -> None:
        self._annotate(wp.namespace, wp.pod, None)
        port, argv, proc, _ = self._spawn(pod)
        wp.port, wp.argv, wp.proc, wp.annotated, wp.restarts = port, argv, proc, False, wp.restarts + 1

    def _terminate(self, wp: WorkerProcess) -> None:
        if wp.proc.poll() is None:
            try:
                os.killpg(wp.proc.pid, signal.SIGTERM)
                wp.proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(wp.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                wp.proc.wait(timeout=5)

    @staticmethod
    def _healthy(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=0.5) as resp:
                return resp.status == 200
        except OSError:
            return False

    def _annotate(self, ns: str, pod: str, endpoint: str | None) -> None:
        from kubernetes.client.rest import ApiException

        try:
            self.api.patch_namespaced_pod(pod, ns, {"metadata": {"annotations": {c.ANNOT_LOCAL_ENDPOINT: endpoint}}})
        except ApiException as exc:
            if exc.status != 404:
                raise
