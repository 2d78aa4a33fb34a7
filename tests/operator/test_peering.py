"""kopf peering: with `--peering`, a second operator replica stays passive while a higher-priority one is alive,
and takes over when it leaves. Real API server, real operator subprocesses (as the manifests' ServiceAccount)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
from lorafleet.operator import constants as c
from lorafleet.operator import resources as res

from lorafleet.local.harness import LocalFleet, free_port, service_account_kubeconfig, wait_for
from lorafleet.local.samples import basemodel

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]


def test_passive_replica_takes_over(op_cluster, crds, tmp_path: Path) -> None:
    ns = f"peer-{uuid.uuid4().hex[:6]}"
    sa = service_account_kubeconfig(op_cluster.kubeconfig, tmp_path / "sa.kubeconfig", ROOT / "manifests")
    live = free_port()
    a = LocalFleet(
        op_cluster.kubeconfig,
        ns,
        tmp_path / "a",
        operator_kubeconfig=sa,
        operator_args=["--liveness-port", str(live), "--liveness-host", "127.0.0.1"],
    )
    live_b = free_port()
    # B keeps the default --liveness-host (all addresses), what the Deployment's probes need
    b = LocalFleet(
        op_cluster.kubeconfig,
        ns,
        tmp_path / "b",
        operator_kubeconfig=sa,
        operator_args=["--liveness-port", str(live_b)],
    )
    a.ensure_namespace()
    a.custom.create_namespaced_custom_object(
        "kopf.dev",
        "v1",
        ns,
        "kopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "lf"}},
    )
    try:
        a.start_operator(["--peering", "lf", "--priority", "10"])
        wait_for(lambda: "Initial authentication has finished" in a.operator_log(), 30, 0.2, "A up")
        # kopf's liveness endpoint answers once the operator runs (what the Deployment's probes call)
        wait_for(lambda: a.http.get(f"http://127.0.0.1:{live}/healthz", timeout=2).status_code == 200, 30, 0.2)
        b.start_operator(["--peering", "lf", "--priority", "5"])
        wait_for(lambda: "Initial authentication has finished" in b.operator_log(), 30, 0.2, "B up")
        # kubelet probes the pod IP: B's /healthz answers on a non-loopback address, A's (127.0.0.1) does not
        listening = {
            (conn.laddr.ip, conn.laddr.port) for conn in psutil.net_connections("tcp") if conn.status == "LISTEN"
        }
        assert ("0.0.0.0", live_b) in listening and ("127.0.0.1", live) in listening
        pod_ip = _non_loopback_ipv4()
        if pod_ip is not None:
            wait_for(lambda: a.http.get(f"http://{pod_ip}:{live_b}/healthz", timeout=2).status_code == 200, 30, 0.2)
            with pytest.raises(httpx.ConnectError):
                a.http.get(f"http://{pod_ip}:{live}/healthz", timeout=2)
        a.create(c.BASEMODELS, basemodel("served-by-a", "/nonexistent/model", replicas=0))
        wait_for(lambda: a.apps.read_namespaced_deployment(res.worker_name("served-by-a"), ns), 30, 0.2, "A acts")
        time.sleep(5)
        # kopf starts every peered replica paused; B must never resume while A (priority 10) is alive
        assert "Resuming operations" not in b.operator_log()
        assert "served-by-a" not in b.operator_log()
        a.stop_operator()  # graceful: A removes itself from the peering object
        wait_for(lambda: "Resuming operations" in b.operator_log(), 60, 0.2, "B resumes")
        a.create(c.BASEMODELS, basemodel("served-by-b", "/nonexistent/model", replicas=0))
        wait_for(lambda: a.apps.read_namespaced_deployment(res.worker_name("served-by-b"), ns), 30, 0.2, "B acts")
    finally:
        a.close()
        b.close()


def _non_loopback_ipv4() -> str | None:
    """An address of this host other than loopback (the stand-in for a pod IP), if it has one."""
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family.name == "AF_INET" and not addr.address.startswith("127."):
                return addr.address
    return None
