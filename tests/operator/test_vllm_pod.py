"""Stock vLLM worker pods as the operator builds them: admitted by a real API server that enforces Pod Security
`restricted`, with the model resolved by an init container, no `VLLM_API_KEY`, a startup probe sized for model
loading, a memory-backed /dev/shm, and a preStop hook that drains like `lorafleet drain-wait`.

The pods go through the API server with `dryRun=All` (validation, defaulting and admission, Pod Security included,
without a kubelet to run vLLM). The drain hook runs as the exact command the pod spec holds, against a real worker
process that serves the same `/v1/models` shape as vLLM. The NetworkPolicy example of docs/stores.md is admitted by
the same API server.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from lorafleet.operator import podspec
from lorafleet.operator import resources as res

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]


def vllm_basemodel(name: str, uri: str, **worker: object) -> dict:
    return {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "BaseModel",
        "metadata": {"name": name, "namespace": "ns", "uid": "u-1"},
        "spec": {
            "source": {"uri": uri},
            "engine": "vllm",
            "replicas": 1,
            "worker": {"port": 8000, "resources": {"limits": {"nvidia.com/gpu": 1}}, **worker},
            "limits": {"maxAdapters": 4, "maxRank": 16},
        },
    }


def pod_of(bm: dict) -> dict:
    template = res.worker_deployment(bm)["spec"]["template"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "w-", **template["metadata"]},
            "spec": template["spec"]}  # fmt: skip


@pytest.fixture(scope="module")
def restricted_ns(op_cluster):
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(op_cluster.kubeconfig))
    core = client.CoreV1Api(api)
    ns = f"vllm-{uuid.uuid4().hex[:6]}"
    labels = {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    core.create_namespace({"metadata": {"name": ns, "labels": labels}})
    try:
        yield api, ns
    finally:
        core.delete_namespace(ns)
        api.close()


def test_vllm_pods_are_admitted_under_restricted_as_built(restricted_ns) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    api, ns = restricted_ns
    core = client.CoreV1Api(api)
    for uri in ("s3://models/tiny", "hf://org/tiny@v1", "pvc://assets/model"):
        bm = vllm_basemodel("tiny", uri, claims=["assets"] if uri.startswith("pvc") else [])
        bm["spec"]["worker"]["podTemplate"] = {"env": [{"name": "AWS_ENDPOINT_URL_S3", "value": "http://s3:9000"}]}
        pod = core.create_namespaced_pod(ns, pod_of(bm), dry_run="All")  # what the API server admits and stores
        (ctr,) = pod.spec.containers
        env = {e.name: e.value for e in ctr.env}
        assert "VLLM_API_KEY" not in env and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert ctr.security_context.read_only_root_filesystem and ctr.security_context.run_as_non_root
        assert ctr.security_context.capabilities.drop == ["ALL"]
        assert ctr.startup_probe.http_get.path == "/health"
        assert ctr.startup_probe.period_seconds * ctr.startup_probe.failure_threshold >= 1800
        assert ctr.readiness_probe.http_get.path == "/health" and ctr.liveness_probe.http_get.path == "/health"
        shm = next(v for v in pod.spec.volumes if v.name == "dshm")
        assert shm.empty_dir.medium == "Memory"
        assert {m.mount_path for m in ctr.volume_mounts} >= {"/dev/shm", "/cache", "/tmp"}
        hook = ctr.lifecycle.pre_stop._exec.command
        assert hook[:2] == ["python3", "-c"] and hook[3:] == ["8000", str(res.DRAIN_WAIT_SECONDS)]
        assert pod.spec.termination_grace_period_seconds > res.DRAIN_WAIT_SECONDS
        assert all(v.host_path is None for v in pod.spec.volumes)
        model = ctr.args[ctr.args.index("--model") + 1]
        if uri.startswith("pvc://"):
            assert model == "/var/lib/lorafleet/claims/assets/model" and not pod.spec.init_containers
            continue
        (init,) = pod.spec.init_containers  # s3:// and hf://: a verified local copy in the pod's cache emptyDir
        assert model == "/cache/model" and "--revision" not in ctr.args
        assert init.command == ["lorafleet", "fetch"] and init.args[:3] == [uri, "--kind", "model"]
        assert init.args[init.args.index("--link") + 1] == "/cache/model"
        assert init.security_context.run_as_non_root and init.security_context.allow_privilege_escalation is False
        assert {e.name: e.value for e in init.env}["AWS_ENDPOINT_URL_S3"] == "http://s3:9000"  # the user's env too
        assert {m.mount_path for m in init.volume_mounts} == {"/cache", "/tmp"}
    # the namespace enforces: the same pod with a hostPath model is refused
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod(ns, pod_of(vllm_basemodel("hosty", "file:///models/tiny")), dry_run="All")
    assert err.value.status == 403 and "violates PodSecurity" in err.value.body and "hostPath" in err.value.body


def test_the_documented_network_policy_is_accepted(restricted_ns) -> None:
    from kubernetes import client

    api, ns = restricted_ns
    text = (ROOT / "docs" / "stores.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "NetworkPolicy" in b]
    policy = yaml.safe_load(block)
    made = client.NetworkingV1Api(api).create_namespaced_network_policy(ns, policy, dry_run="All")
    assert made.spec.pod_selector.match_labels == {"app.kubernetes.io/component": "worker"}
    (rule,) = made.spec.ingress
    assert rule.ports[0].port == 8000 and len(rule._from) == 2
    assert made.spec.policy_types == ["Ingress"]


def test_vllm_drain_hook_waits_until_no_adapter_is_listed(tiny_assets) -> None:
    from lorafleet.worker.api.testing import start_worker

    hook = podspec.vllm_drain_hook(0, 60)["exec"]["command"]
    w = start_worker(str(tiny_assets["model"]), adapter_roots=[str(tiny_assets["adapters"])], max_num_seqs=2)
    port = w.url.rsplit(":", 1)[1]
    try:
        r = httpx.post(f"{w.url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(tiny_assets["r4"])})
        assert r.status_code == 200, r.text
        cmd = [sys.executable, *hook[1:3], port, "60"]
        proc = subprocess.Popen(cmd)
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=2)  # the adapter is still listed: the hook holds the container up
            r = httpx.post(f"{w.url}/v1/unload_lora_adapter", json={"lora_name": "a"})
            assert r.status_code == 200, r.text
            assert proc.wait(timeout=30) == 0  # drained: SIGTERM may come
        finally:
            proc.kill()
        # a worker that still holds an adapter at the timeout is let go (the grace period is bounded)
        r = httpx.post(f"{w.url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(tiny_assets["r4"])})
        assert r.status_code == 200
        assert subprocess.run([sys.executable, *hook[1:3], port, "1"], timeout=30).returncode == 0
    finally:
        w.close()
    # a server that no longer answers: nothing to wait for
    assert subprocess.run([sys.executable, *hook[1:3], port, "60"], timeout=30).returncode == 0
