"""The local control plane is real: version, TLS + RBAC, controllers + scheduler + KWOK turn a Deployment into
Running pods with IPs on fake GPU nodes (GPU capacity is enforced), and teardown leaves nothing running or listening,
also when the owner is interrupted or killed."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorafleet.controlplane import ControlPlane, binaries, versions
from lorafleet.controlplane.nodes import GPU_RESOURCE, POD_CIDR

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]


def listening_ports(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state owned by one of `pids` (read from /proc)."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                addr_hex, port_hex = fields[1].split(":")
                raw = bytes.fromhex(addr_hex)
                addr = socket.inet_ntop(
                    socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw[::-1] if len(raw) == 4 else raw
                )
                found.add((addr, int(port_hex, 16)))
    return found


def alive(pid: int) -> bool:
    """False once the process is gone or a zombie whose threads have all exited (a multi-threaded process shows its
    leader as a zombie while other threads still run and hold its sockets)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().split(")")[-1].split()[0]
        return state != "Z" or len(os.listdir(f"/proc/{pid}/task")) > 1
    except FileNotFoundError:
        return False


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_version_tls_and_rbac(cluster: ControlPlane) -> None:
    assert cluster.request("GET", "/version")["gitVersion"] == versions()["K8S_VERSION"]
    assert cluster.server.startswith("https://127.0.0.1:")
    # Anonymous requests get no API access: RBAC is on and the client certificate is what grants admin.
    import ssl
    import urllib.error
    import urllib.request

    ctx = ssl.create_default_context(cafile=str(cluster.ca_cert))
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(cluster.server + "/api/v1/namespaces/kube-system/secrets", context=ctx, timeout=10)
    assert err.value.code in (401, 403)
    modes = cluster.kubectl(
        "auth", "can-i", "list", "secrets", "-A", "--as=system:serviceaccount:default:default", check=False
    )
    assert modes.stdout.strip() == "no"
    # The service-account token controller and the signing key work: a token can be minted and is accepted.
    token = cluster.kubectl("create", "token", "default", "-n", "default").stdout.strip()
    review = cluster.request(
        "POST",
        "/apis/authentication.k8s.io/v1/tokenreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}},
    )
    assert review["status"]["authenticated"] is True
    assert review["status"]["user"]["username"] == "system:serviceaccount:default:default"


def test_fake_gpu_nodes(cluster: ControlPlane) -> None:
    nodes = cluster.request("GET", "/api/v1/nodes?labelSelector=type%3Dkwok")["items"]
    assert len(nodes) >= 3
    for node in nodes:
        assert node["status"]["capacity"][GPU_RESOURCE] == "8"
        assert node["status"]["allocatable"][GPU_RESOURCE] == "8"
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True"
        lease = cluster.request(
            "GET", f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node['metadata']['name']}"
        )
        assert lease["spec"]["leaseDurationSeconds"] == 40 and lease["spec"]["renewTime"]  # KWOK keeps it fresh


def test_deployment_yields_running_pods_and_gpu_capacity_is_enforced(cluster: ControlPlane, namespace: str) -> None:
    """7 replicas asking 3 GPUs each on 3 nodes of 8 GPUs: exactly 6 fit (2 per node), the 7th stays Pending."""
    gpu_nodes = len(cluster.request("GET", "/api/v1/nodes?labelSelector=type%3Dkwok")["items"])
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "gpu-workers"},
        "spec": {
            "replicas": 2 * gpu_nodes + 1,
            "selector": {"matchLabels": {"app": "gpu-workers"}},
            "template": {
                "metadata": {"labels": {"app": "gpu-workers"}},
                "spec": {
                    "containers": [{"name": "w", "image": "worker:test", "resources": {"limits": {GPU_RESOURCE: "3"}}}]
                },
            },
        },
    }
    cluster.request("POST", f"/apis/apps/v1/namespaces/{namespace}/deployments", deployment)
    cluster.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/services",
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "gpu-workers"},
            "spec": {"selector": {"app": "gpu-workers"}, "ports": [{"port": 8000}]},
        },
    )
    deadline = time.monotonic() + 60
    while True:
        pods = cluster.request("GET", f"/api/v1/namespaces/{namespace}/pods")["items"]
        running = [p for p in pods if p["status"].get("phase") == "Running" and p["status"].get("podIP")]
        if len(running) == 2 * gpu_nodes or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(running) == 2 * gpu_nodes
    cidr = ipaddress.ip_network(POD_CIDR)
    ips = [p["status"]["podIP"] for p in running]
    assert len(set(ips)) == len(ips) and all(ipaddress.ip_address(ip) in cidr for ip in ips)
    per_node: dict[str, int] = {}
    for p in running:
        per_node[p["spec"]["nodeName"]] = per_node.get(p["spec"]["nodeName"], 0) + 1
    assert sorted(per_node.values()) == [2] * gpu_nodes
    (pending,) = [p for p in pods if p["status"].get("phase") == "Pending"]
    query = f"/api/v1/namespaces/{namespace}/events?fieldSelector=involvedObject.name%3D{pending['metadata']['name']}"
    deadline = time.monotonic() + 30
    while True:
        messages = [e["message"] for e in cluster.request("GET", query)["items"] if e["reason"] == "FailedScheduling"]
        if any(f"Insufficient {GPU_RESOURCE}" in m for m in messages) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert any(f"Insufficient {GPU_RESOURCE}" in m for m in messages), messages
    # The endpointslice controller publishes exactly the running pods' IPs (EndpointSlice validation accepts them).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        slices = cluster.request("GET", f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices")["items"]
        addresses = sorted(a for s in slices for e in s.get("endpoints") or [] for a in e["addresses"])
        if addresses == sorted(ips):
            break
        time.sleep(0.5)
    assert addresses == sorted(ips)


def test_teardown_leaves_nothing_listening() -> None:
    cp = ControlPlane(controllers=True, kwok=True, kwok_nodes=1, quiet=True).start()
    try:
        pids = list(cp.pids().values())
        assert len(pids) == 5
        listening = listening_ports(pids)
        # Everything listens on loopback only, and on the ports the control plane reserved for it.
        assert listening and {addr for addr, _ in listening} == {"127.0.0.1"}
        assert {port for _, port in listening} >= {cp.ports["apiserver"], cp.ports["etcd"]}
        state_dir = cp.state_dir
    finally:
        cp.stop()
    assert not any(alive(pid) for pid in pids)
    assert not any(port_open(port) for _, port in listening)
    assert not state_dir.exists()  # a temporary state dir is removed


def _interruptible() -> None:
    """Child side: SIGINT back to its default. A shell without job control starts background jobs with SIGINT
    ignored and children inherit that, so under `cmd &` (or nohup) a Ctrl-C test could never interrupt anything."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn_owner(code: str) -> tuple[subprocess.Popen[str], dict[str, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        preexec_fn=_interruptible,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "owner process died before the control plane was ready"
    return proc, json.loads(line)


OWNER = """
import json, sys, time
from lorafleet.controlplane import ControlPlane
cp = ControlPlane(quiet=True).start()
print(json.dumps({**cp.pids(), "port": cp.ports["apiserver"]}), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "SIGINT", "SIGKILL"]
)
def test_owner_interrupted_or_killed_leaves_nothing_running(signum: int) -> None:
    """SIGTERM runs the chained handler, SIGINT unwinds through atexit, SIGKILL relies on PR_SET_PDEATHSIG."""
    proc, info = _spawn_owner(OWNER)
    port = info.pop("port")
    pids = list(info.values())
    assert len(pids) == 2 and all(alive(p) for p in pids) and port_open(port)
    proc.send_signal(signum)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)
    assert not port_open(port)


def test_lorafleet_cluster_command(tmp_path: Path) -> None:
    """`lorafleet cluster` prints an export line, serves kubectl, keeps its state dir, and stops on Ctrl-C."""
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorafleet.cli", "cluster", "--state-dir", str(state), "--kwok-nodes", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        preexec_fn=_interruptible,
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(3)]
    try:
        assert lines[1].strip() == f"export KUBECONFIG={state / 'kubeconfig'}"
        cp_state = json.loads((state / "state.json").read_text())
        env = {**os.environ, "KUBECONFIG": str(state / "kubeconfig")}
        kubectl = str(binaries().kubectl)
        nodes = subprocess.run(
            [kubectl, "get", "nodes", "-o", "name"], env=env, capture_output=True, text=True, check=True
        ).stdout
        assert nodes.split() == ["node/kwok-gpu-0"]
        subprocess.run([kubectl, "create", "namespace", "kept"], env=env, capture_output=True, check=True)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    assert not any(alive(pid) for pid in cp_state["pids"].values())
    assert (state / "pki" / "ca.crt").exists() and (state / "etcd").is_dir()  # kept for a restart
    assert not port_open(cp_state["ports"]["apiserver"])
    # A restart on the kept state dir finds its objects and reuses its nodes instead of adding more.
    with ControlPlane(state, kwok=True, kwok_nodes=1, quiet=True) as again:
        assert again.request("GET", "/api/v1/namespaces/kept")["metadata"]["name"] == "kept"
        assert [n["metadata"]["name"] for n in again.request("GET", "/api/v1/nodes")["items"]] == ["kwok-gpu-0"]


def test_k8s_api_fixture_is_a_working_admin_client(k8s_api: object) -> None:
    from kubernetes import client

    nodes = client.CoreV1Api(k8s_api).list_node(label_selector="type=kwok").items
    assert len(nodes) >= 3 and all(n.status.capacity[GPU_RESOURCE] == "8" for n in nodes)
    access = client.AuthorizationV1Api(k8s_api).create_self_subject_access_review(
        client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(verb="*", resource="*", group="*")
            )
        )
    )
    assert access.status.allowed is True  # system:masters
