"""The sample fleet in a namespace that enforces Pod Security `restricted`, against the real API server.

The worker pods the operator builds must be admitted there as they are: a BaseModel whose model comes from a
PersistentVolumeClaim, an adapter from the same claim (mounted read-only) and one from a real S3 server, both
serving completions through their routes; an adapter on a claim the BaseModel does not mount gets a condition that
names it. A BaseModel that opts into a hostPath is refused by the same namespace, which shows the policy is on.
A serving adapter switched to each bad source (missing bucket or object, checksum mismatch, pickle weights, a path
out of its claim, the S3 endpoint gone) gets a Degraded condition naming that source while its previous weights
keep answering.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from lorafleet.operator import constants as c
from lorafleet.operator import resources as res
from lorafleet.worker.lora.sources.s3server import S3Server

from lorafleet.local.harness import LocalFleet, service_account_kubeconfig, wait_for
from lorafleet.local.samples import adapter

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]


def basemodel(name: str, uri: str, replicas: int, **worker: object) -> dict:
    return {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "BaseModel",
        "metadata": {"name": name},
        "spec": {
            "source": {"uri": uri},
            "dtype": "float32",
            "replicas": replicas,
            "worker": {"resources": {"limits": {"nvidia.com/gpu": 1}}, **worker},
            "limits": {"maxAdapters": 4, "maxCpuAdapters": 16, "maxRank": 16},
        },
    }


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 server (versitygw) with an `adapters` bucket."""
    with S3Server(tmp_path_factory.mktemp("s3") / "root") as srv:
        srv.client().create_bucket(Bucket="adapters")
        yield srv


@pytest.fixture(scope="module")
def restricted(op_cluster, crds, tiny_assets, tmp_path_factory, s3):
    ns = f"psa-{uuid.uuid4().hex[:6]}"
    state = tmp_path_factory.mktemp("restricted")
    sa = service_account_kubeconfig(op_cluster.kubeconfig, state / "operator.kubeconfig", ROOT / "manifests")
    client = s3.client()
    for p in tiny_assets["r8"].iterdir():
        client.put_object(Bucket="adapters", Key=f"tenants/s3a/{p.name}", Body=p.read_bytes())
    lf = LocalFleet(
        op_cluster.kubeconfig,
        ns,
        state,
        operator_kubeconfig=sa,
        adapter_root=str(state / "adapters"),
        operator_args=["--interval", "0.5", "--drain-grace", "0.5", "--rebalance-interval", "0"],
        worker_extra_args=["--max-num-seqs", "8", "--kv-cache-bytes", str(16 << 20)],
    )
    labels = {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    lf.core.create_namespace({"metadata": {"name": ns, "labels": labels}})
    pv = f"{ns}-assets"
    lf.core.create_persistent_volume(
        {
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": str(tiny_assets["model"].parent)},
            },
        }
    )
    lf.core.create_namespaced_persistent_volume_claim(
        ns,
        {
            "metadata": {"name": "assets"},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": pv,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    lf.start_shim(env=s3.env())
    lf.start_operator()
    try:
        yield lf
    finally:
        lf.close()
        lf.core.delete_persistent_volume(pv)


def test_sample_fleet_runs_in_a_restricted_namespace(restricted: LocalFleet) -> None:
    fleet = restricted
    fleet.create(c.BASEMODELS, basemodel("tiny", "pvc://assets/model", 2, claims=["assets"]))
    wait_for(
        lambda: (fleet.get(c.BASEMODELS, "tiny").get("status") or {}).get("readyWorkers") == 2, 180, 0.5, "2 workers"
    )
    pods = fleet.worker_pods("tiny")
    assert len(pods) == 2
    for pod in pods:  # what the API server admitted under restricted
        spec = pod.spec
        assert spec.security_context.run_as_non_root and spec.security_context.seccomp_profile.type == "RuntimeDefault"
        assert all(v.host_path is None for v in spec.volumes)
        claim = next(v for v in spec.volumes if v.persistent_volume_claim is not None)
        assert claim.persistent_volume_claim.claim_name == "assets" and claim.persistent_volume_claim.read_only
    fleet.create(c.ADAPTERS, adapter("pvca", "tiny", "pvc://assets/adapters/r4"))
    fleet.create(c.ADAPTERS, adapter("s3a", "tiny", "s3://adapters/tenants/s3a"))
    fleet.create(c.ADAPTERS, adapter("stray", "tiny", "pvc://elsewhere/a"))
    for name in ("pvca", "s3a"):
        routes = wait_for(lambda name=name: fleet.routes(name), 60, 0.2, f"{name} routed")
        r = fleet.complete(name, routes[0][1])
        assert r.status_code == 200, r.text
    ready = wait_for(
        lambda: (
            (cond := fleet.condition(c.ADAPTERS, "stray", "Ready")) and cond["reason"] == "ClaimNotMounted" and cond
        ),
        30,
        0.2,
        "stray refused",
    )
    assert ready["status"] == "False" and "pvc://elsewhere/a" in ready["message"]
    # the namespace really enforces: a worker pod with a hostPath adapter store is refused there
    fleet.create(c.BASEMODELS, basemodel("hosty", "pvc://assets/model", 1, adapterStore={"hostPath": "/tmp/x"}))

    def refused() -> str | None:
        for rs in fleet.apps.list_namespaced_replica_set(fleet.namespace).items:
            if rs.metadata.name.startswith(res.worker_name("hosty")):
                for cond in rs.status.conditions or []:
                    if cond.type == "ReplicaFailure" and "violates PodSecurity" in (cond.message or ""):
                        return cond.message
        return None

    message = wait_for(refused, 60, 0.5, "hostPath pod refused by Pod Security")
    assert "restricted:latest" in message and "hostPath" in message
    assert fleet.worker_pods("hosty") == []


def test_a_bad_new_source_gets_a_condition_naming_it_and_the_previous_version_keeps_serving(
    restricted: LocalFleet, s3, tiny_assets, tmp_path
) -> None:
    """The bad-input list of the stores, each through the operator, a real worker and the real S3 server: the
    adapter's Degraded condition names the refused source and why, the previous weights keep answering, and nothing
    half-written is loaded. Wrong credentials and a download cut mid-object are covered against the same server in
    tests/worker/test_sources.py (credentials are the worker's, not the adapter's)."""
    fleet = restricted
    routes = wait_for(lambda: fleet.routes("s3a"), 60, 0.2, "s3a routed")
    token = fleet.admin_token("tiny")
    good = {p: fleet.worker_adapters(ep, token)["s3a"] for p, ep in routes}
    client = s3.client()
    r4 = tiny_assets["r4"]
    for p in sorted(r4.iterdir()):  # checksum mismatch: the recorded sha256 is not the content's
        client.put_object(
            Bucket="adapters", Key=f"bad/tampered/{p.name}", Body=p.read_bytes(), Metadata={"sha256": "0" * 64}
        )
    config = (r4 / "adapter_config.json").read_bytes()
    client.put_object(Bucket="adapters", Key="bad/pickle/adapter_config.json", Body=config)
    client.put_object(Bucket="adapters", Key="bad/pickle/adapter_model.bin", Body=b"\x80\x04K\x01.")
    weights = (r4 / "adapter_model.safetensors").read_bytes()
    client.put_object(Bucket="adapters", Key="bad/cut/adapter_config.json", Body=config)
    client.put_object(Bucket="adapters", Key="bad/cut/adapter_model.safetensors", Body=weights[: len(weights) - 100])
    outside = tmp_path / "outside"
    outside.mkdir()
    for p in r4.iterdir():
        (outside / p.name).write_bytes(p.read_bytes())
    escape = tiny_assets["model"].parent / f"escape-{fleet.namespace}"  # inside the claim, pointing out of it
    escape.symlink_to(outside)
    cases = {
        "s3://no-such-bucket/a": "bucket does not exist",
        "s3://adapters/bad/missing": "no objects under this prefix",
        "s3://adapters/bad/tampered": "checksum mismatch",
        "s3://adapters/bad/pickle": "only pickle weights",
        "s3://adapters/bad/cut": "safetensors",
        f"pvc://assets/{escape.name}": "outside claim",
    }

    def refused(uri: str, why: str):
        cond = fleet.condition(c.ADAPTERS, "s3a", "Degraded")
        msg = (cond or {}).get("message") or ""
        return (
            cond if cond["status"] == "True" and cond["reason"] == "LoadFailed" and uri in msg and why in msg else None
        )

    def still_serving() -> None:
        assert [p for p, _ in fleet.routes("s3a")] == [p for p, _ in routes]
        for p, ep in routes:
            now = fleet.worker_adapters(ep, token)["s3a"]
            assert (now["path"], now["version"]) == (good[p]["path"], good[p]["version"])
            r = fleet.complete("s3a", ep)
            assert r.status_code == 200, r.text
        assert fleet.condition(c.ADAPTERS, "s3a", "Ready")["status"] == "True"

    try:
        for uri, why in cases.items():
            fleet.patch(c.ADAPTERS, "s3a", {"spec": {"source": {"uri": uri}}})
            wait_for(lambda uri=uri, why=why: refused(uri, why), 60, 0.2, f"condition naming {uri}")
            still_serving()
        # the endpoint goes away: an existing object cannot be fetched
        for p in r4.iterdir():
            client.put_object(Bucket="adapters", Key=f"tenants/s3b/{p.name}", Body=p.read_bytes())
        s3.stop()
        try:
            fleet.patch(c.ADAPTERS, "s3a", {"spec": {"source": {"uri": "s3://adapters/tenants/s3b"}}})
            wait_for(lambda: refused("s3://adapters/tenants/s3b", "unreachable"), 90, 0.2, "unreachable endpoint")
            still_serving()
        finally:
            s3.start()
        fleet.patch(c.ADAPTERS, "s3a", {"spec": {"source": {"uri": "s3://adapters/tenants/s3a"}}})
        wait_for(
            lambda: fleet.condition(c.ADAPTERS, "s3a", "Degraded")["status"] == "False", 60, 0.2, "back to its source"
        )
        still_serving()
    finally:
        escape.unlink()
