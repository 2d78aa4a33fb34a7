"""manifests/: the kustomize base renders, passes a server-side dry run, really deploys onto the KWOK cluster
(Pod Security `restricted` admits the operator pod), and its ClusterRole grants exactly the least privilege."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet.controlplane import ControlPlane, binaries

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
SA = "system:serviceaccount:lorafleet-system:lorafleet-operator"


def rendered() -> list[dict[str, Any]]:
    import subprocess

    out = subprocess.run(
        [str(binaries().kubectl), "kustomize", str(MANIFESTS)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_base_renders_every_part() -> None:
    docs = rendered()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["CustomResourceDefinition"] * 5
        + ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service"]
    )
    for doc in docs:
        if doc["kind"] not in ("CustomResourceDefinition", "Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == "lorafleet-system", doc["kind"]
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "lorafleet-operator", "namespace": "lorafleet-system"}
    ]


def test_operator_deployment_is_hardened() -> None:
    (deploy,) = by_kind(rendered(), "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["serviceAccountName"] == "lorafleet-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert set(container["resources"]) == {"requests", "limits"}
    assert container["args"][:3] == ["operator", "--all-namespaces", "--peering=lorafleet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (
        f"--metrics-port={ports['metrics']}" in container["args"]
        and f"--liveness-port={ports['health']}" in container["args"]
    )
    # kubelet probes the pod IP, so /healthz must listen on every address, not on loopback only
    assert "--liveness-host=0.0.0.0" in container["args"]
    (svc,) = by_kind(rendered(), "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert svc["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]


def test_cluster_role_is_least_privilege() -> None:
    (role,) = by_kind(rendered(), "ClusterRole")
    grants = {
        (g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert not any("*" in (g, r) or "*" in verbs for (g, r), verbs in grants.items())
    assert grants[("", "secrets")] == {"create", "get"}  # never list/watch every secret, never rewrite one
    assert grants[("", "pods")] == {"get", "list", "watch", "patch"}  # patch: pod-deletion-cost of victims
    assert grants[("lorafleet.io", "loraadapters/status")] == {"patch"}
    assert grants[("lorafleet.io", "basemodels/finalizers")] == {"update"}
    assert grants[("kopf.dev", "clusterkopfpeerings")] >= {"get", "list", "watch", "patch"}
    assert grants[("apiextensions.k8s.io", "customresourcedefinitions")] == {"get", "list", "watch"}
    for resource in ("deployments", "services", "endpointslices", "poddisruptionbudgets"):
        assert any(r == resource and "create" in v for (_, r), v in grants.items())
    # children of a BaseModel are garbage-collected through ownerReferences, never deleted by the operator
    assert "delete" not in grants[("apps", "deployments")] | grants[("policy", "poddisruptionbudgets")]
    assert not any(
        r in ("clusterroles", "roles", "rolebindings", "nodes", "configmaps", "serviceaccounts") for _, r in grants
    )


@pytest.mark.cluster
def test_server_side_dry_run(crds_installed: ControlPlane) -> None:
    # A dry run creates nothing, so the namespace its namespaced objects go to must exist already.
    crds_installed.kubectl("create", "namespace", "lorafleet-system", check=False)
    result = crds_installed.kubectl("apply", "-k", str(MANIFESTS), "--dry-run=server")
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 11 and all(line.endswith("(server dry run)") for line in lines), result.stdout
    with pytest.raises(Exception):  # noqa: B017 - a dry run must not have created anything
        crds_installed.request("GET", "/apis/apps/v1/namespaces/lorafleet-system/deployments/lorafleet-operator")


@pytest.mark.cluster
def test_real_apply_runs_the_operator_pod_and_rbac_holds(crds_installed: ControlPlane) -> None:
    cp = crds_installed
    cp.kubectl("apply", "-k", str(MANIFESTS))
    try:
        cp.kubectl("apply", "-k", str(MANIFESTS / "peering"))
        # KWOK runs the pod: Pod Security "restricted" (enforced on the namespace) admitted it and it became Ready.
        cp.kubectl("rollout", "status", "-n", "lorafleet-system", "deployment/lorafleet-operator", "--timeout=90s")
        pods = json.loads(cp.kubectl("get", "pods", "-n", "lorafleet-system", "-o", "json").stdout)["items"]
        assert (
            len(pods) == 1
            and pods[0]["status"]["phase"] == "Running"
            and pods[0]["spec"]["nodeName"].startswith("kwok-gpu-")
        )
        peering = cp.request("GET", "/apis/kopf.dev/v1/clusterkopfpeerings/lorafleet")
        assert peering["metadata"]["name"] == "lorafleet"

        def can(verb: str, resource: str, *extra: str) -> bool:
            out = cp.kubectl("auth", "can-i", verb, resource, f"--as={SA}", *extra, check=False).stdout.strip()
            return out == "yes"

        allowed = [
            ("get", "secrets", "-n", "default"),
            ("create", "secrets", "-n", "team-a"),
            ("create", "deployments.apps", "-n", "team-a"),
            ("delete", "endpointslices.discovery.k8s.io", "-n", "team-a"),
            ("patch", "loraadapters.lorafleet.io", "--subresource=status", "-n", "team-a"),
            ("watch", "basemodels.lorafleet.io", "-A"),
            ("patch", "clusterkopfpeerings.kopf.dev"),
            ("create", "events", "-n", "team-a"),
            ("list", "pods", "-A"),
        ]
        denied = [
            ("list", "secrets", "-A"),
            ("watch", "secrets", "-n", "default"),
            ("delete", "pods", "-n", "team-a"),
            ("create", "pods", "-n", "team-a"),
            ("create", "clusterroles.rbac.authorization.k8s.io"),
            ("patch", "nodes"),
            ("create", "customresourcedefinitions.apiextensions.k8s.io"),
            ("delete", "basemodels.lorafleet.io", "-n", "team-a"),
        ]
        assert [a for a in allowed if not can(*a)] == []
        assert [d for d in denied if can(*d)] == []
    finally:
        cp.kubectl("delete", "-k", str(MANIFESTS / "peering"), "--wait=false", check=False)
        cp.kubectl(
            "delete",
            "-k",
            str(MANIFESTS),
            "-l",
            "app.kubernetes.io/name=lorafleet-operator",
            "--wait=false",
            check=False,
        )
        cp.kubectl("delete", "namespace", "lorafleet-system", "--wait=false", check=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if "lorafleet-operator" not in cp.kubectl("get", "clusterrole", "-o", "name").stdout:
            break
        time.sleep(0.5)
    assert "lorafleet-operator" not in cp.kubectl("get", "clusterrole", "-o", "name").stdout


def test_namespaced_overlay_confines_the_operator_to_one_namespace() -> None:
    """overlays/namespaced: every namespaced grant sits in a Role in the watched namespace, the ClusterRole keeps only
    cluster-scoped reads, and the operator watches that namespace alone (standalone, Recreate)."""
    from lorafleet.operator.rbac import USED

    out = subprocess.run(
        [str(binaries().kubectl), "kustomize", str(MANIFESTS.parent / "overlays" / "namespaced")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]

    def triples(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
        return {(g, r, v) for x in rules for g in x["apiGroups"] for r in x["resources"] for v in x["verbs"]}

    (cluster,) = by_kind(docs, "ClusterRole")
    (role,) = by_kind(docs, "Role")
    (binding,) = by_kind(docs, "RoleBinding")
    assert {r for _, r, _ in triples(cluster["rules"])} == {"customresourcedefinitions", "namespaces"}
    assert {v for _, _, v in triples(cluster["rules"])} == {"get", "list", "watch"}
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "lorafleet-workloads"
    cluster_scoped = {"customresourcedefinitions", "namespaces", "clusterkopfpeerings"}
    assert triples(role["rules"]) == {t for t in USED if t[1] not in cluster_scoped}
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "lorafleet-operator", "namespace": "lorafleet-system"}
    ]
    (deploy,) = by_kind(docs, "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=lorafleet-workloads" in args and "--standalone" in args and "--all-namespaces" not in args
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
