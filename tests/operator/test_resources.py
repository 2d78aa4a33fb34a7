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


def test_vllm_engine_uses_stock_flags_without_api_key() -> None:
    bm = {**BM, "spec": {**BM["spec"], "engine": "vllm", "worker": {"port": 8000}}}
    pod = res.worker_deployment(bm)["spec"]["template"]["spec"]
    ctr = pod["containers"][0]
    assert ctr["image"].startswith("vllm/vllm-openai")
    assert "--enable-lora" in ctr["args"] and "command" not in ctr
    assert ctr["args"][ctr["args"].index("--max-loras") + 1] == "8"
    env = {e["name"]: e for e in ctr["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "True"
    assert "VLLM_API_KEY" not in env  # it would guard every /v1 route, completions included
    # model loading may take long: a startup probe holds liveness off for 30 min; /dev/shm is a memory emptyDir
    assert ctr["startupProbe"]["httpGet"]["path"] == "/health"
    assert ctr["startupProbe"]["periodSeconds"] * ctr["startupProbe"]["failureThreshold"] == 1800
    assert ctr["readinessProbe"]["httpGet"]["path"] == "/health"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory"}
    assert {m["mountPath"] for m in ctr["volumeMounts"]} >= {"/dev/shm", "/cache", "/tmp"}


def test_vllm_model_sources_become_what_vllm_accepts() -> None:
    def pod(uri: str) -> dict:
        bm = {**BM, "spec": {**BM["spec"], "engine": "vllm", "source": {"uri": uri}, "worker": {"port": 8000}}}
        return res.worker_deployment(bm)["spec"]["template"]["spec"]

    for uri in ("s3://models/llama-8b", "hf://meta/llama@v1.2"):
        p = pod(uri)
        (init,) = p["initContainers"]
        assert init["command"] == ["lorafleet", "fetch"] and init["args"][0] == uri
        assert init["args"][init["args"].index("--link") + 1] == "/cache/model"
        args = p["containers"][0]["args"]
        assert args[args.index("--model") + 1] == "/cache/model" and "--revision" not in args
        assert init["securityContext"]["runAsNonRoot"] is True and init["securityContext"]["readOnlyRootFilesystem"]
    args = pod("pvc://models/llama/8b")["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "/var/lib/lorafleet/claims/models/llama/8b"


def test_model_mount_schemes() -> None:
    assert res.model_mount("pvc://models/llama/8b").arg == "pvc://models/llama/8b"  # the worker resolves it
    (vol,) = res.model_mount("pvc://models/llama/8b").volumes
    assert vol["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert res.model_mount("pvc://models/llama/8b").mounts[0]["mountPath"] == "/var/lib/lorafleet/claims/models"
    assert res.model_mount("hf://meta/llama").arg == "hf://meta/llama"
    assert res.model_mount("hf://meta/llama").volumes == ()


RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def test_default_pod_is_hardened_and_spread() -> None:
    bm = {**BM, "spec": {**BM["spec"], "source": {"uri": "pvc://models/llama"}, "worker": {"claims": ["tenants"]}}}
    dep = res.worker_deployment(bm)
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}  # no spare GPU needed
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctr = pod["containers"][0]
    sc = ctr["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
    kinds = {next(k for k in v if k != "name") for v in pod["volumes"]}
    assert kinds <= RESTRICTED_VOLUMES, kinds  # no hostPath unless the spec asks for one
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["adapters"] == {"name": "adapters", "emptyDir": {}}
    claims = {v["persistentVolumeClaim"]["claimName"]: v for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert set(claims) == {"models", "tenants"} and all(v["persistentVolumeClaim"]["readOnly"] for v in claims.values())
    mounts = {m["mountPath"]: m for m in ctr["volumeMounts"]}
    assert mounts["/var/lib/lorafleet/claims/tenants"]["readOnly"] is True
    assert {"/cache", "/tmp", "/dev/shm"} <= set(mounts)
    args = ctr["args"]
    assert args[args.index("--claim-root") + 1] == "/var/lib/lorafleet/claims"
    assert args[args.index("--source-cache") + 1] == "/cache/sources"
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_adapter_store_volume_is_what_the_spec_names() -> None:
    def vol(store):
        bm = {**BM, "spec": {**BM["spec"], "worker": {"adapterStore": store}}}
        return next(
            v for v in res.worker_deployment(bm)["spec"]["template"]["spec"]["volumes"] if v["name"] == "adapters"
        )

    assert vol({"claimName": "cl-versions"})["persistentVolumeClaim"] == {"claimName": "cl-versions"}
    assert vol({"hostPath": "/srv/adapters"})["hostPath"]["path"] == "/srv/adapters"  # opted in


def test_pod_template_fields_are_merged() -> None:
    template = {
        "labels": {"team": "ml"},
        "annotations": {"a": "b"},
        "serviceAccountName": "workers",
        "imagePullSecrets": [{"name": "regcred"}],
        "priorityClassName": "gpu-high",
        "nodeSelector": {"zone": "a"},
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}},
        "tolerations": [{"key": "t", "operator": "Exists"}],
        "topologySpreadConstraints": [{"maxSkew": 2, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}],
        "securityContext": {"runAsUser": 1000, "runAsGroup": 1000},
        "containerSecurityContext": {"readOnlyRootFilesystem": False},
        "volumes": [{"name": "extra", "configMap": {"name": "cm"}}, {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
        "volumeMounts": [{"name": "extra", "mountPath": "/etc/extra"}],
        "env": [
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
            {"name": "HOME", "value": "/home"},
        ],
    }
    bm = {**BM, "spec": {**BM["spec"], "worker": {**BM["spec"]["worker"], "podTemplate": template}}}
    dep = res.worker_deployment(bm)
    meta = dep["spec"]["template"]["metadata"]
    assert (
        meta["labels"]["team"] == "ml"
        and meta["labels"][c.LABEL_BASEMODEL] == "llama"
        and meta["annotations"] == {"a": "b"}
    )
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "workers" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["priorityClassName"] == "gpu-high" and pod["affinity"] == template["affinity"]
    assert pod["nodeSelector"] == {"gpu": "h100", "zone": "a"}
    assert [t["key"] for t in pod["tolerations"]] == ["gpu", "t"]
    assert pod["topologySpreadConstraints"] == template["topologySpreadConstraints"]
    assert pod["securityContext"]["runAsUser"] == 1000 and pod["securityContext"]["runAsNonRoot"] is True
    ctr = pod["containers"][0]
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is False and ctr["securityContext"]["capabilities"] == {
        "drop": ["ALL"]
    }
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["extra"]["configMap"] == {"name": "cm"} and vols["tmp"]["emptyDir"] == {"sizeLimit": "1Gi"}
    assert {m["mountPath"] for m in ctr["volumeMounts"]} >= {"/etc/extra", "/tmp"}
    env = {e["name"]: e for e in ctr["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf" and env["HOME"]["value"] == "/home"
    assert len([e for e in ctr["env"] if e["name"] == "HOME"]) == 1


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
