"""The shipped ClusterRole against what the operator calls (operator/rbac.py), and what the real API server lets
that ServiceAccount do (access reviews, admission on dry-run writes) in cluster-wide and in namespaced mode.

The lifecycle suite additionally runs the operator *as* the manifests' ServiceAccount under the admission policy, so
a missing rule fails there with a 403; this test names the gap (or the surplus) precisely: the role must equal USED.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from lorafleet.operator.rbac import USED

ROOT = Path(__file__).resolve().parents[2]


def granted() -> set[tuple[str, str, str]]:
    role = yaml.safe_load((ROOT / "manifests/clusterrole.yaml").read_text())
    out = set()
    for rule in role["rules"]:
        for g in rule.get("apiGroups", []):
            for r in rule.get("resources", []):
                for v in rule.get("verbs", []):
                    out.add((g, r, v))
    return out


def test_every_call_the_operator_makes_is_granted() -> None:
    missing = USED - granted()
    assert not missing, sorted(missing)


def test_no_wildcards_and_secrets_are_not_enumerable() -> None:
    g = granted()
    assert not any("*" in part for rule in g for part in rule)
    assert not {("", "secrets", v) for v in ("list", "watch", "delete")} & g
    assert not {("", "pods", v) for v in ("create", "update", "delete")} & g  # patch: pod-deletion-cost only


def test_the_role_grants_exactly_what_the_operator_uses() -> None:
    """No surplus: every grant beyond USED would be privilege nobody exercises (and nobody reviews)."""
    surplus = granted() - USED
    assert not surplus, sorted(surplus)
    assert granted() == USED


SA_USER = "system:serviceaccount:lorafleet-system:lorafleet-operator"
OURS = {"app.kubernetes.io/managed-by": "lorafleet-operator"}


def _deployment(name: str, ns: str, labels: dict[str, str]) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": "x"}]}},
        },
    }


def _refusal(fn, *args, **kwargs) -> str:  # noqa: ANN001, ANN002, ANN003 - any client call
    from kubernetes.client.rest import ApiException

    try:
        fn(*args, **kwargs)
    except ApiException as exc:
        return f"{exc.status}: {exc.body}"
    return ""


@pytest.mark.cluster
def test_cluster_wide_operator_is_confined_by_the_real_api_server(op_cluster, crds, admission, tmp_path) -> None:  # noqa: ANN001
    """manifests/ + manifests/admission/, installed into the real API server. RBAC, asked as the ServiceAccount
    itself (SelfSubjectAccessReview, what `kubectl auth can-i` sends): the verbs of USED and nothing else, in every
    namespace. Admission, on real (dry-run) writes as that ServiceAccount: only objects labelled as its own, never
    in kube-system, never a foreign object taken over or deleted."""
    import time

    from kubernetes import client
    from lorafleet.operator.kube import load_config

    from lorafleet.local.harness import service_account_kubeconfig

    sa_api = load_config(str(service_account_kubeconfig(op_cluster.kubeconfig, tmp_path / "sa", ROOT / "manifests")))
    admin = load_config(str(op_cluster.kubeconfig))
    authz = client.AuthorizationV1Api(sa_api)

    def can(verb: str, resource: str, ns: str | None = None, group: str = "", sub: str = "") -> bool:
        attrs = {"verb": verb, "resource": resource, "group": group, "subresource": sub}
        if ns is not None:
            attrs["namespace"] = ns
        review = authz.create_self_subject_access_review({"spec": {"resourceAttributes": attrs}})
        return bool(review.status.allowed)

    for ns in ("default", "kube-system"):
        assert can("create", "deployments", ns, "apps") and can("patch", "endpointslices", ns, "discovery.k8s.io")
        assert can("get", "secrets", ns)  # by name: RBAC cannot narrow it (docs/operator.md, RBAC)
        for verb in ("list", "watch", "update", "patch", "delete"):
            assert not can(verb, "secrets", ns), verb
        for verb in ("update", "delete", "deletecollection"):
            assert not can(verb, "deployments", ns, "apps"), verb
        for verb in ("create", "update", "delete"):
            assert not can(verb, "pods", ns), verb
        assert not can("create", "pods", ns, sub="exec") and not can("get", "configmaps", ns)
        assert not can("create", "rolebindings", ns, "rbac.authorization.k8s.io")
    assert not can("create", "clusterrolebindings", group="rbac.authorization.k8s.io")
    assert not can("impersonate", "users") and not can("escalate", "clusterroles", group="rbac.authorization.k8s.io")
    assert not can("get", "nodes") and not can("create", "namespaces")

    apps_admin, core_admin = client.AppsV1Api(admin), client.CoreV1Api(admin)
    apps_sa, core_sa = client.AppsV1Api(sa_api), client.CoreV1Api(sa_api)
    ns = "rbac-probe"
    core_admin.create_namespace({"metadata": {"name": ns}})
    try:
        apps_admin.create_namespaced_deployment(ns, _deployment("foreign", ns, {}))
        core_admin.create_namespaced_service(ns, {"metadata": {"name": "foreign"}, "spec": {"ports": [{"port": 80}]}})
        ours = _deployment("ours", ns, OURS)
        deadline = time.monotonic() + 20
        while _refusal(apps_sa.create_namespaced_deployment, ns, _deployment("x", ns, {}), dry_run="All") == "":
            assert time.monotonic() < deadline, "the admission policy never took effect"
            time.sleep(0.2)  # the API server loads a new policy within a second or so
        assert _refusal(apps_sa.create_namespaced_deployment, ns, ours, dry_run="All") == ""
        unlabelled = _refusal(apps_sa.create_namespaced_deployment, ns, _deployment("x", ns, {}), dry_run="All")
        assert "writes only objects labelled" in unlabelled
        system = _refusal(apps_sa.create_namespaced_deployment, "kube-system", _deployment("x", "kube-system", OURS), dry_run="All")  # fmt: skip
        assert "system namespaces" in system
        takeover = {"metadata": {"labels": OURS}}
        assert "changes only objects it owns" in _refusal(
            apps_sa.patch_namespaced_deployment, "foreign", ns, takeover, dry_run="All"
        )
        assert "changes only objects it owns" in _refusal(
            core_sa.delete_namespaced_service, "foreign", ns, dry_run="All"
        )
        # its own child (owned by a BaseModel) with the label removed by hand: the repair, which puts the label
        # back, passes; a change that leaves it off does not
        from lorafleet.operator import constants as c

        from lorafleet.local.samples import basemodel

        bm = client.CustomObjectsApi(admin).create_namespaced_custom_object(
            c.GROUP, c.VERSION, ns, c.BASEMODELS, basemodel("probe", "/models/probe", replicas=1)
        )
        ref = {
            "apiVersion": f"{c.GROUP}/{c.VERSION}",
            "kind": "BaseModel",
            "name": "probe",
            "uid": bm["metadata"]["uid"],
        }
        owned = _deployment("ours", ns, OURS)
        owned["metadata"]["ownerReferences"] = [ref]
        apps_admin.create_namespaced_deployment(ns, owned)
        apps_admin.patch_namespaced_deployment("ours", ns, {"metadata": {"labels": {k: None for k in OURS}}})
        note = {"metadata": {"annotations": {"a": "b"}}}
        assert "writes only objects labelled" in _refusal(
            apps_sa.patch_namespaced_deployment, "ours", ns, note, dry_run="All"
        )
        repair = {"metadata": {"labels": OURS}}
        assert _refusal(apps_sa.patch_namespaced_deployment, "ours", ns, repair, dry_run="All") == ""
    finally:
        core_admin.delete_namespace(ns)


@pytest.mark.cluster
def test_namespaced_overlay_is_confined_to_its_namespace_by_the_real_api_server(op_cluster, crds) -> None:  # noqa: ANN001
    """overlays/namespaced/ RBAC applied to the real API server (under a probe ServiceAccount name, so the
    cluster-wide install of the other tests stays as it is); SubjectAccessReview answers for that account: its
    writes and Secret reads exist only in lorafleet-workloads."""
    import subprocess

    from kubernetes import client
    from lorafleet.operator.kube import load_config

    from lorafleet.controlplane import binaries

    out = subprocess.run(
        [str(binaries().kubectl), "kustomize", str(ROOT / "overlays" / "namespaced")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    probe = "lorafleet-ns-probe"
    docs = [d for d in yaml.safe_load_all(out.replace("name: lorafleet-operator\n", f"name: {probe}\n")) if d]
    admin = load_config(str(op_cluster.kubeconfig))
    rbac, core = client.RbacAuthorizationV1Api(admin), client.CoreV1Api(admin)
    authz = client.AuthorizationV1Api(admin)
    from kubernetes.client.rest import ApiException

    try:
        core.create_namespace({"metadata": {"name": "lorafleet-workloads"}})
    except ApiException as exc:
        if exc.status != 409:
            raise
    create = {
        "ClusterRole": lambda d: rbac.create_cluster_role(d),
        "ClusterRoleBinding": lambda d: rbac.create_cluster_role_binding(d),
        "Role": lambda d: rbac.create_namespaced_role(d["metadata"]["namespace"], d),
        "RoleBinding": lambda d: rbac.create_namespaced_role_binding(d["metadata"]["namespace"], d),
    }
    grants = [d for d in docs if d["kind"] in create]
    assert sorted(d["kind"] for d in grants) == ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"]
    for d in grants:
        create[d["kind"]](d)
    user = f"system:serviceaccount:lorafleet-system:{probe}"
    groups = ["system:serviceaccounts", "system:serviceaccounts:lorafleet-system", "system:authenticated"]

    def can(verb: str, resource: str, ns: str | None = None, group: str = "") -> bool:
        attrs = {"verb": verb, "resource": resource, "group": group, **({"namespace": ns} if ns else {})}
        body = {"spec": {"user": user, "groups": groups, "resourceAttributes": attrs}}
        return bool(authz.create_subject_access_review(body).status.allowed)

    try:
        watched = "lorafleet-workloads"
        assert can("create", "deployments", watched, "apps") and can("get", "secrets", watched)
        assert can("patch", "loraadapters", watched, "lorafleet.io")
        for ns in ("default", "kube-system", "lorafleet-system"):
            assert not can("create", "deployments", ns, "apps"), ns
            assert not can("get", "secrets", ns), ns
            assert not can("patch", "loraadapters", ns, "lorafleet.io"), ns
            assert not can("list", "pods", ns), ns
        assert not can("list", "secrets", watched) and not can("delete", "deployments", watched, "apps")
        assert can("list", "customresourcedefinitions", group="apiextensions.k8s.io")
        assert not can("patch", "clusterkopfpeerings", group="kopf.dev")
    finally:
        for d in grants:
            name, where = d["metadata"]["name"], d["metadata"].get("namespace")
            if d["kind"] == "ClusterRole":
                rbac.delete_cluster_role(name)
            elif d["kind"] == "ClusterRoleBinding":
                rbac.delete_cluster_role_binding(name)
            elif d["kind"] == "Role":
                rbac.delete_namespaced_role(name, where)
            else:
                rbac.delete_namespaced_role_binding(name, where)
