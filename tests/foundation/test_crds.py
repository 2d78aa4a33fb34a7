"""The CRDs against the real API server: they establish, the samples are accepted, invalid specs are rejected with a
message that names the bad field (and the Python models reject them too), status/scale subresources and transition
rules behave."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from lorafleet import crds
from lorafleet.controlplane import ApiError, ControlPlane

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]

BASE = {"source": {"uri": "hf://HuggingFaceTB/SmolLM2-135M"}, "replicas": 1}
ADAPTER = {"baseModel": "smollm2", "source": {"uri": "s3://adapters/a"}, "replicas": {"min": 1, "max": 2}}
JOB = {"adapter": "support-en", "mode": "colocated"}


def patched(spec: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Deep copy of `spec` with `path` (dotted) set to `value`; value `...` deletes the key."""
    out = copy.deepcopy(spec)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node.setdefault(key, {})
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return out


# (kind, spec, field the API server must name in its message)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("BaseModel", patched(BASE, "replicas", -1), "spec.replicas"),
    ("BaseModel", patched(BASE, "source.uri", "ftp://models/x"), "spec.source.uri"),
    ("BaseModel", patched(BASE, "source.uri", "models/relative"), "spec.source.uri"),
    ("BaseModel", patched(BASE, "source", ...), "spec.source"),
    ("BaseModel", patched(BASE, "limits.kvCacheFraction", 1.5), "spec.limits.kvCacheFraction"),
    ("BaseModel", patched(BASE, "limits.kvCacheFraction", 0), "spec.limits.kvCacheFraction"),
    ("BaseModel", patched(BASE, "limits.maxRank", 0), "spec.limits.maxRank"),
    ("BaseModel", patched(BASE, "limits.maxAdapters", 0), "spec.limits.maxAdapters"),
    ("BaseModel", patched(BASE, "dtype", "int4"), "spec.dtype"),
    ("BaseModel", patched(BASE, "worker.port", 70000), "spec.worker.port"),
    (
        "BaseModel",
        {**BASE, "engine": "vllm", "source": {"uri": "/m/model.gguf", "format": "gguf"}},
        "spec.source.format",
    ),
    ("BaseModel", patched(BASE, "limits", {"maxAdapters": 16, "maxCpuAdapters": 4}), "spec.limits.maxCpuAdapters"),
    (
        "BaseModel",
        patched(BASE, "limits", {"maxBatchedTokens": 512, "finetuneTokenBudget": 1024}),
        "spec.limits.finetuneTokenBudget",
    ),
    ("BaseModel", patched(BASE, "execution", {"cudaGraphs": "prefill"}), "spec.execution.cudaGraphs"),
    ("BaseModel", {**BASE, "engine": "vllm", "execution": {"asyncScheduling": True}}, "spec.execution"),
    ("BaseModel", {**BASE, "engine": "vllm", "execution": {"cudaGraphs": "decode"}}, "spec.execution"),
    ("LoRAAdapter", patched(ADAPTER, "baseModel", ...), "spec.baseModel"),
    ("LoRAAdapter", patched(ADAPTER, "baseModel", ""), "spec.baseModel"),
    ("LoRAAdapter", patched(ADAPTER, "baseModel", "Not_A_Name"), "spec.baseModel"),
    ("LoRAAdapter", patched(ADAPTER, "rank", 0), "spec.rank"),
    ("LoRAAdapter", patched(ADAPTER, "replicas", {"min": 3, "max": 2}), "spec.replicas.min"),
    ("LoRAAdapter", patched(ADAPTER, "replicas", {"min": -1, "max": 2}), "spec.replicas.min"),
    ("LoRAAdapter", patched(ADAPTER, "replicas", {"min": 0}), "spec.replicas.min"),
    ("LoRAAdapter", patched(ADAPTER, "replicas", {"min": 1, "auto": True}), "spec.replicas.max"),
    ("LoRAAdapter", patched(ADAPTER, "source.uri", "gs://bucket/adapter"), "spec.source.uri"),
    ("LoRAAdapter", patched(ADAPTER, "source.uri", "pvc://Bad_Claim/x"), "spec.source.uri"),
    ("LoRAAdapter", patched(ADAPTER, "priority", 5000), "spec.priority"),
    ("ContinualLearningJob", patched(JOB, "adapter", ...), "spec.adapter"),
    ("ContinualLearningJob", patched(JOB, "mode", "sidecar"), "spec.mode"),
    ("ContinualLearningJob", patched(JOB, "replayRatio", 1.5), "spec.replayRatio"),
    ("ContinualLearningJob", patched(JOB, "replayRatio", 0.95), "spec.replayRatio"),
    ("ContinualLearningJob", patched(JOB, "minFinetuneShare", -0.1), "spec.minFinetuneShare"),
    ("ContinualLearningJob", patched(JOB, "maxActivationStaleness", -1), "spec.maxActivationStaleness"),
    ("ContinualLearningJob", patched(JOB, "stalePolicy", "keep"), "spec.stalePolicy"),
    ("ContinualLearningJob", patched(JOB, "optimizer", {"learningRate": 0}), "spec.optimizer.learningRate"),
    ("ContinualLearningJob", patched(JOB, "optimizer", {"betas": [0.9, 0.99, 0.999]}), "spec.optimizer.betas"),
    ("ContinualLearningJob", patched(JOB, "optimizer", {"batchSize": 0}), "spec.optimizer.batchSize"),
    ("ContinualLearningJob", patched(JOB, "lora", {"dropout": 1.0}), "spec.lora.dropout"),
    ("ContinualLearningJob", patched(JOB, "lora", {"rank": 0}), "spec.lora.rank"),
    ("ContinualLearningJob", patched(JOB, "feedback", {"accept": False, "corrections": False}), "spec.feedback"),
    ("ContinualLearningJob", {**JOB, "mode": "dedicated"}, "spec.mode"),
    ("ContinualLearningJob", patched(JOB, "latencyTarget", {"tpotMillis": 0}), "spec.latencyTarget.tpotMillis"),
    (
        "ContinualLearningJob",
        patched(JOB, "latencyTarget", {"tpotMillis": 50, "percentile": 101}),
        "spec.latencyTarget.percentile",
    ),
    ("ContinualLearningJob", patched(JOB, "publish", {"everySteps": 0}), "spec.publish.everySteps"),
    ("ContinualLearningJob", patched(JOB, "coServing", {"placement": "gpu0"}), "spec.coServing.placement"),
    ("ContinualLearningJob", patched(JOB, "coServing", {"placement": "fused"}), "fused are not offered"),
    ("ContinualLearningJob", patched(JOB, "coServing", {"servingSMs": 0}), "spec.coServing.servingSMs"),
]


def obj(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": crds.API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


def path(namespace: str, kind: str, name: str = "") -> str:
    base = f"/apis/{crds.GROUP}/{crds.VERSION}/namespaces/{namespace}/{crds.PLURALS[kind]}"
    return f"{base}/{name}" if name else base


def test_every_crd_is_established_and_discoverable(crds_installed: ControlPlane) -> None:
    for kind, plural in crds.PLURALS.items():
        crd = crds_installed.request(
            "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{plural}.{crds.GROUP}"
        )
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions == {"NamesAccepted": "True", "Established": "True"}, kind
        assert crd["status"]["acceptedNames"]["shortNames"] == crds.SHORT_NAMES[kind]
    resources = crds_installed.kubectl("api-resources", f"--api-group={crds.GROUP}", "-o", "wide").stdout
    for kind, plural in crds.PLURALS.items():
        line = next(row for row in resources.splitlines() if row.startswith(plural + " "))
        assert kind in line and ",".join(crds.SHORT_NAMES[kind]) in line and crds.CATEGORY in line
    for peering in ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"):
        crd = crds_installed.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{peering}")
        assert {c["type"]: c["status"] for c in crd["status"]["conditions"]}["Established"] == "True"


def test_samples_are_accepted_and_parse_with_the_models(crds_installed: ControlPlane, namespace: str) -> None:
    out = crds_installed.kubectl("apply", "-n", namespace, "-k", str(REPO / "manifests" / "samples")).stdout
    assert out.count("created") == 5, out
    items = json.loads(crds_installed.kubectl("get", "lorafleet", "-n", namespace, "-o", "json").stdout)["items"]
    kinds = sorted(item["kind"] for item in items)
    assert kinds == ["BaseModel", "ContinualLearningJob", "LoRAAdapter", "LoRAAdapter", "LoRAAdapter"]
    for item in items:
        spec = crds.SPEC_MODELS[item["kind"]].model_validate(item["spec"])
        # What the server stored (with its defaults) is exactly what the model round-trips.
        assert spec.model_dump(by_alias=True, exclude_none=True) == item["spec"]
    table = crds_installed.kubectl("get", "lora", "-n", namespace).stdout.splitlines()
    assert table[0].split()[:5] == ["NAME", "BASE", "PHASE", "VERSION", "MIN"]
    assert len(table) == 4 and all(" smollm2 " in row for row in table[1:])
    for sample in (REPO / "manifests" / "samples").glob("*.yaml"):
        doc = yaml.safe_load(sample.read_text())
        if doc.get("kind") in crds.KINDS:
            crds.SPEC_MODELS[doc["kind"]].model_validate(doc["spec"])


@pytest.mark.parametrize(
    ("kind", "spec", "field"), INVALID, ids=[f"{k}-{f}-{i}" for i, (k, _, f) in enumerate(INVALID)]
)
def test_invalid_spec_is_rejected_naming_the_field(
    crds_installed: ControlPlane, kind: str, spec: dict[str, Any], field: str
) -> None:
    with pytest.raises(ApiError) as err:
        crds_installed.request("POST", path("default", kind) + "?dryRun=All", obj(kind, "invalid", spec))
    assert err.value.status == 422
    message = err.value.body["message"]
    assert field in message, message
    with pytest.raises(pydantic.ValidationError):  # the Python models refuse the same spec
        crds.SPEC_MODELS[kind].model_validate(spec)


def test_execution_options_each_engine_supports_are_admitted(crds_installed: ControlPlane) -> None:
    for spec in (
        {**BASE, "execution": {"cudaGraphs": "decode", "asyncScheduling": True}},
        {**BASE, "engine": "vllm", "execution": {"cudaGraphs": "none"}},
        {**BASE, "engine": "vllm", "execution": {}},
    ):
        out = crds_installed.request("POST", path("default", "BaseModel") + "?dryRun=All", obj("BaseModel", "ok", spec))
        stored = crds.BaseModelSpec.model_validate(out["spec"])
        assert stored.execution is not None and out["spec"]["execution"]["cudaGraphs"] in ("decode", "none", "all")


def test_at_least_twelve_distinct_rejections() -> None:
    assert len({field for _, _, field in INVALID}) >= 12


def test_name_length_rule(crds_installed: ControlPlane) -> None:
    with pytest.raises(ApiError) as err:
        crds_installed.request("POST", path("default", "BaseModel") + "?dryRun=All", obj("BaseModel", "m" * 53, BASE))
    assert "metadata.name must be at most 52 characters" in err.value.body["message"]


def test_references_are_immutable(crds_installed: ControlPlane, namespace: str) -> None:
    crds_installed.request("POST", path(namespace, "LoRAAdapter"), obj("LoRAAdapter", "a", ADAPTER))
    crds_installed.request("POST", path(namespace, "ContinualLearningJob"), obj("ContinualLearningJob", "j", JOB))
    merge = "application/merge-patch+json"
    with pytest.raises(ApiError) as err:
        crds_installed.request(
            "PATCH", path(namespace, "LoRAAdapter", "a"), {"spec": {"baseModel": "other"}}, content_type=merge
        )
    assert "spec.baseModel is immutable" in err.value.body["message"]
    with pytest.raises(ApiError) as err:
        crds_installed.request(
            "PATCH", path(namespace, "ContinualLearningJob", "j"), {"spec": {"adapter": "b"}}, content_type=merge
        )
    assert "spec.adapter is immutable" in err.value.body["message"]
    # Other fields stay mutable, and a spec change bumps the generation.
    updated = crds_installed.request(
        "PATCH", path(namespace, "LoRAAdapter", "a"), {"spec": {"priority": 7}}, content_type=merge
    )
    assert updated["spec"]["priority"] == 7 and updated["metadata"]["generation"] == 2


def test_status_subresource(crds_installed: ControlPlane, namespace: str) -> None:
    merge = "application/merge-patch+json"
    created = crds_installed.request("POST", path(namespace, "LoRAAdapter"), obj("LoRAAdapter", "a", ADAPTER))
    status = crds.LoRAAdapterStatus(
        phase="Ready",
        version="v3",
        placements=[crds.Placement(pod="w-0", node="kwok-gpu-0", since="2026-01-01T00:00:00Z", ready=True)],
        request_rate=12.5,
        conditions=[
            crds.Condition(type="Ready", status="True", reason="Loaded", last_transition_time="2026-01-01T00:00:00Z")
        ],
        observed_generation=1,
        kopf={"progress": {"h": {"retries": 0}}},
    ).model_dump(by_alias=True, exclude_none=True)
    # Status written through the main resource is ignored; through /status it is stored and does not bump generation.
    ignored = crds_installed.request(
        "PATCH", path(namespace, "LoRAAdapter", "a"), {"status": status}, content_type=merge
    )
    assert "status" not in ignored
    stored = crds_installed.request(
        "PATCH", path(namespace, "LoRAAdapter", "a") + "/status", {"status": status}, content_type=merge
    )
    assert stored["status"] == status
    assert stored["metadata"]["generation"] == created["metadata"]["generation"] == 1
    assert crds.LoRAAdapterStatus.model_validate(stored["status"]).placements[0].node == "kwok-gpu-0"
    with pytest.raises(ApiError) as err:
        crds_installed.request(
            "PATCH",
            path(namespace, "LoRAAdapter", "a") + "/status",
            {"status": {"phase": "Sleeping"}},
            content_type=merge,
        )
    assert "status.phase" in err.value.body["message"]
    placements = [{"pod": f"w-{i}"} for i in range(crds.MAX_PLACEMENTS + 1)]
    with pytest.raises(ApiError) as err:
        crds_installed.request(
            "PATCH",
            path(namespace, "LoRAAdapter", "a") + "/status",
            {"status": {"placements": placements}},
            content_type=merge,
        )
    assert "status.placements" in err.value.body["message"]


def test_scale_subresource_and_printer_columns(crds_installed: ControlPlane, namespace: str) -> None:
    crds_installed.request("POST", path(namespace, "BaseModel"), obj("BaseModel", "smollm2", BASE))
    crds_installed.kubectl("scale", "-n", namespace, "bm/smollm2", "--replicas=3")
    scaled = crds_installed.request("GET", path(namespace, "BaseModel", "smollm2"))
    assert scaled["spec"]["replicas"] == 3
    crds_installed.request(
        "PATCH",
        path(namespace, "BaseModel", "smollm2") + "/status",
        {"status": {"readyWorkers": 2}},
        content_type="application/merge-patch+json",
    )
    scale = crds_installed.request("GET", path(namespace, "BaseModel", "smollm2") + "/scale")
    assert (scale["spec"]["replicas"], scale["status"]["replicas"]) == (3, 2)
    header, row = crds_installed.kubectl("get", "bm", "-n", namespace).stdout.splitlines()
    assert header.split() == ["NAME", "ENGINE", "REPLICAS", "READY", "SLOTS", "MESSAGE", "AGE"]
    assert row.split()[:5] == ["smollm2", "lorafleet", "3", "2", "8"]
