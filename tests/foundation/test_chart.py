"""charts/lorafleet: CRDs byte-identical to crds/, lint, template variants, and a real install/uninstall."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet.controlplane import ApiError, ControlPlane, binaries

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "lorafleet"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binaries().helm), *args], capture_output=True, text=True, check=check)


def template(*sets: str) -> list[dict[str, Any]]:
    argv = ["template", "lf", str(CHART), "-n", "lorafleet-helm"]
    for s in sets:
        argv += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*argv).stdout) if d]


def test_chart_crds_are_byte_identical_copies() -> None:
    source = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml") if p.name != "kustomization.yaml"}
    copies = {p.name: p.read_bytes() for p in (CHART / "crds").iterdir()}
    assert len(source) == 5
    assert copies == source, "run: cp crds/*_*.yaml charts/lorafleet/crds/"


def test_lint_strict_and_schema_rejects_bad_values() -> None:
    result = helm("lint", "--strict", str(CHART))
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    bad = helm("lint", "--strict", str(CHART), "--set", "replicaCount=many", check=False)
    assert bad.returncode != 0 and "replicaCount" in bad.stdout + bad.stderr
    typo = helm("template", "x", str(CHART), "--set", "metrics.prot=9", check=False)
    assert typo.returncode != 0 and "prot" in typo.stderr


def test_template_defaults_and_rbac_matches_the_manifests() -> None:
    docs = template()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ClusterKopfPeering"]
        + ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    )
    (policy,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    manifest_policy = yaml.safe_load((REPO / "manifests" / "admission" / "policy.yaml").read_text())
    assert policy["spec"]["validations"] == manifest_policy["spec"]["validations"]
    assert policy["spec"]["variables"] == manifest_policy["spec"]["variables"]
    assert policy["spec"]["matchConditions"][0]["expression"] == (
        "request.userInfo.username == 'system:serviceaccount:lorafleet-helm:lf-lorafleet'"
    )
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    manifest_role = yaml.safe_load((REPO / "manifests" / "clusterrole.yaml").read_text())
    assert role["rules"] == manifest_role["rules"]
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "ghcr.io/lorafleet/operator:0.1.0"
    assert container["args"] == [
        "operator",
        "--all-namespaces",
        "--peering=lf-lorafleet",  # release-scoped: the full name
        "--metrics-port=8080",
        "--liveness-port=8081",
        "--liveness-host=0.0.0.0",
    ]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert deploy["metadata"]["namespace"] == "lorafleet-helm"


def test_template_options() -> None:
    docs = template(
        "peering.enabled=false",
        "watchNamespaces={team-a,team-b}",
        "metrics.serviceMonitor.enabled=true",
        "metrics.podMonitor.enabled=true",
        "admissionPolicy.enabled=false",
    )
    kinds = {d["kind"] for d in docs}
    assert {"ServiceMonitor", "PodMonitor"} <= kinds and "ClusterKopfPeering" not in kinds
    assert "ValidatingAdmissionPolicy" not in kinds
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:4] == ["operator", "--namespace=team-a", "--namespace=team-b", "--standalone"]
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def _install(cp: ControlPlane, release: str, ns: str, values: list[str], *flags: str) -> None:
    """`helm install` of the chart into `ns` (created), with `--set` for each of `values`."""
    sets = [arg for v in values for arg in ("--set", v)]
    cp.helm("install", release, str(CHART), "-n", ns, "--create-namespace", *sets, *flags)


@pytest.mark.cluster
def test_install_creates_objects_and_uninstall_removes_them(crds_installed: ControlPlane) -> None:
    cp = crds_installed
    release, ns = "lf", "lorafleet-helm"
    _install(cp, release, ns, ["peering.name=lorafleet-helm"], "--wait", "--timeout", "120s")
    objects = {
        "deployment": f"/apis/apps/v1/namespaces/{ns}/deployments/lf-lorafleet-operator",
        "serviceaccount": f"/api/v1/namespaces/{ns}/serviceaccounts/lf-lorafleet",
        "service": f"/api/v1/namespaces/{ns}/services/lf-lorafleet-operator-metrics",
        "clusterrole": "/apis/rbac.authorization.k8s.io/v1/clusterroles/lf-lorafleet-operator",
        "clusterrolebinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/lf-lorafleet-operator",
        "peering": "/apis/kopf.dev/v1/clusterkopfpeerings/lorafleet-helm",
    }
    try:
        for name, path in objects.items():
            got = cp.request("GET", path)
            assert got["metadata"]["labels"]["app.kubernetes.io/instance"] == release, name
        deploy = cp.request("GET", objects["deployment"])
        assert deploy["status"]["readyReplicas"] == 1  # --wait saw the KWOK pod Ready
        status = json.loads(cp.helm("status", release, "-n", ns, "-o", "json").stdout)
        assert status["info"]["status"] == "deployed"
    finally:
        cp.helm("uninstall", release, "-n", ns, "--wait", "--timeout", "60s")
    for name, path in objects.items():
        with pytest.raises(ApiError) as err:
            cp.request("GET", path)
        assert err.value.status == 404, name
    # Helm never deletes CRDs it installed from crds/ (so no custom resource is lost with a release).
    cp.request("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/basemodels.lorafleet.io")
    cp.kubectl("delete", "namespace", ns, "--wait=false")


def _triples(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_watch_namespaces_grants_namespaced_rules_only_there() -> None:
    """watchNamespaces: the ClusterRole keeps only cluster-scoped reads (CRDs, namespaces); every namespaced grant
    moves to a Role per watched namespace, and peering becomes a KopfPeering in each. Nothing is lost or added."""
    docs = template("watchNamespaces={team-a,team-b}")
    full = _triples(yaml.safe_load((REPO / "manifests" / "clusterrole.yaml").read_text())["rules"])
    (cluster,) = [d for d in docs if d["kind"] == "ClusterRole"]
    roles = [d for d in docs if d["kind"] == "Role"]
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert {r for _, r, _ in _triples(cluster["rules"])} == {"customresourcedefinitions", "namespaces"}
    assert not {v for _, _, v in _triples(cluster["rules"])} - {"get", "list", "watch"}  # reads only
    for role in roles:
        assert _triples(role["rules"]) == {
            t for t in full if t[1] not in ("customresourcedefinitions", "namespaces", "clusterkopfpeerings")
        }
        assert not {r for _, r, _ in _triples(role["rules"])} & {"namespaces", "customresourcedefinitions"}
    assert _triples(cluster["rules"]) | _triples(roles[0]["rules"]) == full - {
        t for t in full if t[1] == "clusterkopfpeerings"
    }
    for b in bindings:
        assert b["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "lf-lorafleet-operator",
        }
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "lf-lorafleet", "namespace": "lorafleet-helm"}]
    peerings = [d for d in docs if d["kind"] in ("KopfPeering", "ClusterKopfPeering")]
    assert sorted((d["kind"], d["metadata"].get("namespace")) for d in peerings) == [
        ("KopfPeering", "team-a"),
        ("KopfPeering", "team-b"),
    ]


@pytest.mark.cluster
def test_watch_namespaces_install_is_enforced_by_the_api_server(crds_installed: ControlPlane) -> None:
    """Installed into the real API server, the operator's ServiceAccount may patch adapters and create Deployments
    in a watched namespace and nowhere else, and still reads CRDs cluster-wide."""
    cp = crds_installed
    release, ns = "lfns", "lorafleet-scoped"
    for n in ("team-x", "team-y"):
        cp.kubectl("create", "namespace", n, check=False)
    _install(cp, release, ns, ["watchNamespaces={team-x}", "peering.name=scoped"])
    sa = f"system:serviceaccount:{ns}:{release}-lorafleet"

    def can(*args: str) -> str:
        return cp.kubectl("auth", "can-i", *args, f"--as={sa}", check=False).stdout.strip()

    try:
        assert can("patch", "loraadapters.lorafleet.io", "-n", "team-x") == "yes"
        assert can("create", "deployments.apps", "-n", "team-x") == "yes"
        assert can("get", "secrets", "-n", "team-x") == "yes"
        assert can("patch", "loraadapters.lorafleet.io", "-n", "team-y") == "no"
        assert can("create", "deployments.apps", "-n", "team-y") == "no"
        assert can("get", "secrets", "-n", "team-y") == "no"
        assert can("list", "customresourcedefinitions.apiextensions.k8s.io") == "yes"
        assert can("patch", "clusterkopfpeerings.kopf.dev") == "no"
        cp.request("GET", "/apis/kopf.dev/v1/namespaces/team-x/kopfpeerings/scoped")
    finally:
        cp.helm("uninstall", release, "-n", ns, "--wait", "--timeout", "60s")
        cp.kubectl("delete", "namespace", ns, "team-x", "team-y", "--wait=false")


def _helm_bin(major: int) -> Path:
    from lorafleet.controlplane.binaries import helm4

    return binaries().helm if major == 3 else helm4()


@pytest.mark.cluster
@pytest.mark.parametrize("major", [3, 4])
def test_release_lifecycle_with_helm_3_and_4(crds_installed: ControlPlane, major: int) -> None:
    """install, upgrade, rollback, uninstall and second releases under Helm 3 and Helm 4. The CRDs (already present,
    applied from crds/) survive every step unchanged: Helm 3 skips crds/ when they exist, Helm 4 does too on install
    and never touches them on upgrade; neither deletes them. The switch to `peering.enabled=false` (Recreate) is the
    case Helm 4's server-side apply breaks when the chart leaves rollingUpdate to API-server defaults."""
    cp = crds_installed
    exe = str(_helm_bin(major))

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args], capture_output=True, text=True, env=cp.env(), check=check, timeout=300)

    assert run("version", "--short").stdout.startswith(f"v{major}.")
    crd_path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/basemodels.lorafleet.io"
    crd_spec = cp.request("GET", crd_path)["spec"]
    a, b, ns = f"h{major}a", f"h{major}b", f"helm{major}-rel"
    deploy = f"/apis/apps/v1/namespaces/{ns}/deployments/{a}-lorafleet-operator"
    chart = str(CHART)
    run("install", a, chart, "-n", ns, "--create-namespace", "--wait", "--timeout", "120s")
    try:
        peering = cp.request("GET", f"/apis/kopf.dev/v1/clusterkopfpeerings/{a}-lorafleet")  # release-scoped
        assert peering["metadata"]["labels"]["app.kubernetes.io/instance"] == a
        args = cp.request("GET", deploy)["spec"]["template"]["spec"]["containers"][0]["args"]
        assert f"--peering={a}-lorafleet" in args
        # a second cluster-wide release would run a second active operator over the same objects: refused
        second = run("install", b, chart, "-n", ns, check=False)
        assert second.returncode != 0 and f"release {a} already runs a LoRA Fleet operator" in second.stderr
        scoped = run("install", b, chart, "-n", ns, "--set", "watchNamespaces={team-q}", check=False)
        assert scoped.returncode != 0 and "already runs" in scoped.stderr
        run("upgrade", a, chart, "-n", ns, "--set", "peering.enabled=false", "--wait", "--timeout", "120s")
        dep = cp.request("GET", deploy)
        assert dep["spec"]["strategy"]["type"] == "Recreate"  # no peering: never two operators at once
        assert "--standalone" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
        run("rollback", a, "1", "-n", ns, "--wait", "--timeout", "120s")
        dep = cp.request("GET", deploy)
        assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
        history = json.loads(run("history", a, "-n", ns, "-o", "json").stdout)
        assert [h["revision"] for h in history] == [1, 2, 3] and history[-1]["status"] == "deployed"
    finally:
        run("uninstall", a, "-n", ns, "--wait", "--timeout", "60s", check=False)
    with pytest.raises(ApiError) as err:
        cp.request("GET", deploy)
    assert err.value.status == 404
    assert cp.request("GET", crd_path)["spec"] == crd_spec  # CRDs untouched and kept
    # with the cluster-wide release gone, two releases over disjoint namespaces coexist; an overlapping third fails
    for n in ("team-q", "team-r"):
        cp.kubectl("create", "namespace", n, check=False)
    try:
        run("install", b, chart, "-n", ns, "--set", "watchNamespaces={team-q}")
        run("install", f"h{major}c", chart, "-n", ns, "--set", "watchNamespaces={team-r}")
        third = run("install", f"h{major}d", chart, "-n", ns, "--set", "watchNamespaces={team-r,team-s}", check=False)
        assert third.returncode != 0 and f"release h{major}c already runs" in third.stderr
    finally:
        for rel in (b, f"h{major}c"):
            run("uninstall", rel, "-n", ns, "--wait", "--timeout", "60s", check=False)
        cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.mark.cluster
def test_cluster_wide_grants_are_limited_to_what_the_operator_owns(crds_installed: ControlPlane) -> None:
    """Cluster-wide mode (docs/operator.md, RBAC). RBAC: in every namespace the operator may create and patch its
    kinds of children and read a Secret by name, but never list, watch, change or delete Secrets, never delete or
    update Deployments, never create or delete pods, and never touch RBAC. Admission (the chart's
    ValidatingAdmissionPolicy): of those writes only the ones on objects labelled as its own get through, and none
    in kube-system."""
    cp = crds_installed
    release, ns = "lfwide", "lorafleet-wide"
    _install(cp, release, ns, [])
    sa = f"system:serviceaccount:{ns}:{release}-lorafleet"

    def can(*args: str) -> str:
        return cp.kubectl("auth", "can-i", *args, f"--as={sa}", check=False).stdout.strip()

    def create_as_operator(where: str, labels: dict[str, str]) -> subprocess.CompletedProcess[str]:
        dep = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "probe", "namespace": where, "labels": labels},
            "spec": {
                "selector": {"matchLabels": {"app": "probe"}},
                "template": {
                    "metadata": {"labels": {"app": "probe"}},
                    "spec": {"containers": [{"name": "c", "image": "x"}]},
                },
            },
        }
        return cp.kubectl("create", "--dry-run=server", f"--as={sa}", "-f", "-", input=json.dumps(dep), check=False)

    try:
        for where in ("default", "kube-system"):
            assert can("patch", "deployments.apps", "-n", where) == "yes"
            assert can("get", "secrets", "-n", where) == "yes"
            for verb in ("list", "watch", "update", "patch", "delete"):
                assert can(verb, "secrets", "-n", where) == "no", verb
            for verb in ("delete", "update"):
                assert can(verb, "deployments.apps", "-n", where) == "no", verb
            for verb in ("create", "delete", "update"):
                assert can(verb, "pods", "-n", where) == "no", verb
            assert can("create", "roles.rbac.authorization.k8s.io", "-n", where) == "no"
            assert can("create", "configmaps", "-n", where) == "no"
        ours = {"app.kubernetes.io/managed-by": "lorafleet-operator"}
        # the policy is active once the API server has loaded it: poll the allowed write
        ok = None
        for _ in range(100):
            ok = create_as_operator("default", ours)
            if ok.returncode == 0:
                break
            time.sleep(0.2)
        assert ok is not None and ok.returncode == 0, ok.stderr if ok else ""
        foreign = create_as_operator("default", {})
        assert foreign.returncode != 0 and "writes only objects labelled" in foreign.stderr
        system = create_as_operator("kube-system", ours)
        assert system.returncode != 0 and "system namespaces" in system.stderr
    finally:
        cp.helm("uninstall", release, "-n", ns, "--wait", "--timeout", "60s")
        cp.kubectl("delete", "namespace", ns, "--wait=false")
