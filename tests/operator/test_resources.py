"""Builders produce exactly the objects the operator applies: names, owner references, args, volumes, routing."""

from __future__ import annotations

from lorafleet.operator import constants as c
from lorafleet.operator import resources as res

BM = {
    "apiVersion": "lorafleet.io/v1alpha1",
    "kind": "BaseModel",
    "metadata": {"name": "llama", "namespace": "ml", "uid": "u-1", "generation": 3},
    "spec": {
        "source": {"uri": "file:///models/llama"},
        "dtype": "bfloat16",
        "replicas": 3,
        "worker": {
            "image": "example/worker:1",
            "port": 8100,
            "resources": {"limits": {"nvidia.com/gpu": 1}},
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
        },
        "limits": {"maxAdapters": 8, "maxCpuAdapters": 32, "maxRank": 64, "kvCacheFraction": 0.8},
    },
}
ADAPTER = {
    "apiVersion": "lorafleet.io/v1alpha1",
    "kind": "LoRAAdapter",
    "metadata": {"name": "support.bot_v2", "namespace": "ml", "uid": "a-1"},
    "spec": {"baseModel": "llama", "source": {"uri": "file:///adapters/support"}},
}


def test_owner_reference_points_at_owner_and_blocks_deletion() -> None:
    ref = res.owner_reference(BM)
    assert ref == {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "BaseModel",
        "name": "llama",
        "uid": "u-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_deployment_runs_worker_with_token_model_and_limits() -> None:
    dep = res.worker_deployment(BM, adapter_root="/var/lib/lorafleet/adapters")
    assert dep["metadata"]["name"] == "llama-worker"
    assert dep["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["selector"]["matchLabels"] == {c.LABEL_BASEMODEL: "llama", c.LABEL_COMPONENT: "worker"}
    pod = dep["spec"]["template"]["spec"]
    ctr = pod["containers"][0]
    assert ctr["image"] == "example/worker:1"
    assert ctr["command"] == ["lorafleet", "worker"]
    args = ctr["args"]
    pairs = dict(zip(args[::2], args[1::2], strict=False))
    assert pairs["--model"] == "/models/llama"
    assert pairs["--port"] == "8100"
    assert pairs["--admin-token-file"] == "/var/run/lorafleet/admin/token"
    assert pairs["--max-loras"] == "8" and pairs["--max-cpu-loras"] == "32" and pairs["--max-lora-rank"] == "64"
    assert pairs["--kv-cache-fraction"] == "0.8" and pairs["--dtype"] == "bfloat16"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["admin-token"]["secret"]["secretName"] == "llama-admin"
    assert vols["model"]["hostPath"]["path"] == "/models/llama"
    mounts = {m["name"]: m for m in ctr["volumeMounts"]}
    assert mounts["admin-token"]["readOnly"] is True and mounts["model"]["mountPath"] == "/models/llama"
    assert ctr["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"][0]["key"] == "gpu"
    assert pod["automountServiceAccountToken"] is False
    assert ctr["readinessProbe"]["httpGet"]["path"] == "/ready"
    env = {e["name"]: e for e in ctr["env"]}  # the worker's own training state is kept under its pod name
    assert env["LORAFLEET_WORKER_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # the template labels must satisfy the selector or the API server rejects the Deployment
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in dep["spec"]["selector"]["matchLabels"].items())


def test_execution_options_become_worker_flags() -> None:
    def args(execution, engine="lorafleet"):
        bm = {**BM, "spec": {**BM["spec"], "engine": engine, "execution": execution}}
        return res.worker_deployment(bm)["spec"]["template"]["spec"]["containers"][0]["args"]

    flags = {"--enforce-eager", "--no-prefill-graphs", "--async-scheduling", "--no-async-scheduling"}
    assert flags.isdisjoint(args({})) and flags.isdisjoint(args({"cudaGraphs": "all"}))  # unset: the worker decides
    assert flags & set(args({"asyncScheduling": False})) == {"--no-async-scheduling"}
    assert flags & set(args({"cudaGraphs": "decode", "asyncScheduling": True})) == {
        "--no-prefill-graphs",
        "--async-scheduling",
    }
    assert flags & set(args({"cudaGraphs": "none"})) == {"--enforce-eager"}
    assert flags & set(args({"cudaGraphs": "none"}, engine="vllm")) == {"--enforce-eager"}
    # every flag is one `lorafleet worker` accepts
    from lorafleet.worker.main import build_parser

    ns = build_parser().parse_args(["--model", "/m", "--enforce-eager", "--no-prefill-graphs", "--async-scheduling"])
    assert ns.enforce_eager and ns.no_prefill_graphs and ns.async_scheduling
    assert build_parser().parse_args(["--model", "/m", "--no-async-scheduling"]).async_scheduling is False


def test_vllm_engine_uses_stock_flags_and_api_key() -> None:
    bm = {**BM, "spec": {**BM["spec"], "engine": "vllm", "worker": {"port": 8000}}}
    ctr = res.worker_deployment(bm)["spec"]["template"]["spec"]["containers"][0]
    assert ctr["image"].startswith("vllm/vllm-openai")
    assert "--enable-lora" in ctr["args"] and "command" not in ctr
    assert ctr["args"][ctr["args"].index("--max-loras") + 1] == "8"
    env = {e["name"]: e for e in ctr["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "True"
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "llama-admin", "key": "token"}


def test_model_mount_schemes() -> None:
    assert res.model_mount("pvc://models/llama/8b").arg == "/models/llama/8b"
    assert res.model_mount("pvc://models/llama/8b").volumes[0]["persistentVolumeClaim"]["claimName"] == "models"
    assert res.model_mount("hf://meta/llama").arg == "hf://meta/llama"
    assert res.model_mount("hf://meta/llama").volumes == ()


def test_service_pdb_secret() -> None:
    svc = res.worker_service(BM)
    assert svc["spec"]["selector"] == {c.LABEL_BASEMODEL: "llama", c.LABEL_COMPONENT: "worker"}
    assert svc["spec"]["ports"][0]["port"] == 8100
    pdb = res.worker_pdb(BM)
    assert pdb["spec"]["maxUnavailable"] == 1
    sec = res.admin_secret(BM, "tok")
    assert sec["stringData"] == {"token": "tok"} and sec["metadata"]["name"] == "llama-admin"
    assert len(res.new_admin_token()) >= 40 and res.new_admin_token() != res.new_admin_token()


def test_adapter_route_is_headless_without_selector_and_slice_lists_targets() -> None:
    svc = res.adapter_service(ADAPTER, 8100)
    name = svc["metadata"]["name"]
    assert name.startswith("lora-support-bot-v2-") and len(name) <= 63  # sanitised, hash keeps it unique
    assert svc["spec"]["clusterIP"] == "None" and "selector" not in svc["spec"]
    sl = res.adapter_endpointslice(
        ADAPTER,
        8100,
        [res.RouteTarget("w-b", "10.244.1.5", "n1", "u-b"), res.RouteTarget("w-a", "10.244.0.7", "n0", "u-a")],
    )
    assert sl["metadata"]["name"] == name
    assert sl["metadata"]["labels"]["kubernetes.io/service-name"] == name
    assert sl["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == "lorafleet-operator"
    assert [e["addresses"] for e in sl["endpoints"]] == [["10.244.0.7"], ["10.244.1.5"]]  # sorted by pod
    assert sl["endpoints"][0]["targetRef"] == {"kind": "Pod", "name": "w-a", "namespace": "ml", "uid": "u-a"}
    assert sl["ports"] == [{"name": "http", "port": 8100, "protocol": "TCP"}]
    assert res.slice_pods(sl) == ["w-a", "w-b"]
    assert res.adapter_endpointslice(ADAPTER, 8100, [])["endpoints"] == []


def test_dns_label_is_stable_and_valid() -> None:
    assert res.dns_label("simple") == "simple"
    a, b = res.dns_label("x" * 80), res.dns_label("x" * 81)
    assert len(a) == 63 and a != b
    assert res.dns_label("9lives").startswith("x-")
