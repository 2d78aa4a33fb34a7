"""Pure builders for every Kubernetes object the operator owns.

They take CR bodies (plain dicts) and return manifests (plain dicts), so tests can assert on the exact bytes that
will be sent and the handlers stay thin. Nothing here talks to the API server.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lorafleet.operator import constants as c
from lorafleet.operator import podspec

Body = Mapping[str, Any]

VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"
WORKER_IMAGE = "ghcr.io/lorafleet/worker:0.1.0"
# A deleted worker pod: the preStop hook waits up to DRAIN_WAIT_SECONDS for the operator to empty it, inside the
# pod's grace period (the operator's default drain timeout is 60 s; the rest is the handoff's load and grace).
DRAIN_WAIT_SECONDS = 80
TERMINATION_GRACE_SECONDS = 90


def owned_metadata(
    owner: Body, name: str, labels: dict[str, str], *, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    """Metadata of a child object: in its owner's namespace and garbage-collected with it (one place for all six
    kinds of children, so none of them can miss the ownerReference that deletion relies on)."""
    out: dict[str, Any] = {
        "name": name,
        "namespace": owner["metadata"].get("namespace"),
        "labels": labels,
        "ownerReferences": [owner_reference(owner)],
    }
    if annotations:
        out["annotations"] = annotations
    return out


def owner_reference(owner: Body, *, controller: bool = True) -> dict[str, Any]:
    """An ownerReference that makes the API server's garbage collector delete children with their owner."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner.get("apiVersion", c.API_VERSION),
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": controller,
        "blockOwnerDeletion": True,
    }


def dns_label(name: str, prefix: str = "", limit: int = 63) -> str:
    """A DNS-1035 label derived from `name`; long or odd names keep a hash suffix so distinct inputs stay distinct."""
    raw = f"{prefix}{name}".lower()
    clean = re.sub(r"[^a-z0-9-]", "-", raw).strip("-")
    if not clean or not clean[0].isalpha():
        clean = f"x-{clean}"
    if clean == raw and len(clean) <= limit:
        return clean
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return f"{clean[: limit - 9].rstrip('-')}-{digest}"


def worker_labels(basemodel: str) -> dict[str, str]:
    return {c.LABEL_BASEMODEL: basemodel, c.LABEL_COMPONENT: c.COMPONENT_WORKER, c.LABEL_MANAGED_BY: c.MANAGER}


def worker_selector(basemodel: str) -> dict[str, str]:
    return {c.LABEL_BASEMODEL: basemodel, c.LABEL_COMPONENT: c.COMPONENT_WORKER}


def selector_string(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def worker_name(bm_name: str) -> str:
    return dns_label(f"{bm_name}-worker")


def admin_secret_name(bm_name: str) -> str:
    return dns_label(f"{bm_name}-admin")


def adapter_route_name(adapter_name: str) -> str:
    return dns_label(adapter_name, prefix="lora-")


def worker_port(bm: Body) -> int:
    return int(((bm.get("spec") or {}).get("worker") or {}).get("port") or c.DEFAULT_WORKER_PORT)


def engine_of(bm: Body) -> str:
    return str((bm.get("spec") or {}).get("engine") or "lorafleet")


@dataclass(frozen=True)
class ModelMount:
    """How the model source reaches the container: the `--model` argument, extra flags, volumes, mounts and the init
    containers that fill them."""

    arg: str
    volumes: tuple[dict[str, Any], ...] = ()
    mounts: tuple[dict[str, Any], ...] = ()
    extra_args: tuple[str, ...] = ()
    init_containers: tuple[dict[str, Any], ...] = ()


def model_mount(uri: str, engine: str = "lorafleet", fetch_image: str = WORKER_IMAGE) -> ModelMount:
    """Maps a BaseModel source URI onto the worker container.

    file:// and absolute paths are host paths mounted read-only at the same path (the spec asked for a node
    directory; the path means the same on the node, in the container and to the local shim). pvc://claim/sub
    mounts the claim read-only under the claim root. Our workers resolve pvc://, s3:// and hf:// themselves (into
    the verified cache, `docs/stores.md`). Stock vLLM gets what it accepts: the claim's path, or for s3:// and hf://
    a local directory that an init container (`lorafleet fetch`, the worker image) fills with the same verification
    (safetensors only, checksums), so vLLM never downloads a pickle file and needs no hub or S3 credentials itself.
    """
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if uri.startswith("/"):
        vol = {"name": "model", "hostPath": {"path": uri, "type": "Directory"}}
        mnt = {"name": "model", "mountPath": uri, "readOnly": True}
        return ModelMount(uri, (vol,), (mnt,))
    if uri.startswith("pvc://"):
        claim, _, sub = uri[len("pvc://") :].partition("/")
        vol, mnt = podspec.claim_volume(claim)
        arg = uri if engine != "vllm" else f"{podspec.CLAIM_ROOT}/{claim}/{sub}".rstrip("/")
        return ModelMount(arg, (vol,), (mnt,))
    if engine != "vllm":
        return ModelMount(uri)
    target = f"{podspec.CACHE_DIR}/model"
    init = {
        "name": "fetch-model",
        "image": fetch_image,
        "command": ["lorafleet", "fetch"],
        "args": [uri, "--kind", "model", "--cache", f"{podspec.CACHE_DIR}/sources", "--link", target],
        "env": podspec.cache_env(),
        "volumeMounts": [{"name": "cache", "mountPath": podspec.CACHE_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    return ModelMount(target, init_containers=(init,))


def _limit_args(limits: Mapping[str, Any], flags: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for key, flag in flags.items():
        if limits.get(key) is not None:
            out += [flag, str(limits[key])]
    return out


# CRD limit field -> `lorafleet worker` flag. Only flags the worker really accepts belong here.
LORAFLEET_LIMIT_FLAGS: dict[str, str] = {
    "maxAdapters": "--max-loras",
    "maxCpuAdapters": "--max-cpu-loras",
    "maxRank": "--max-lora-rank",
    "kvCacheFraction": "--kv-cache-fraction",
    "maxBatchedTokens": "--max-batched-tokens",
}
VLLM_LIMIT_FLAGS: dict[str, str] = {
    "maxAdapters": "--max-loras",
    "maxCpuAdapters": "--max-cpu-loras",
    "maxRank": "--max-lora-rank",
    "kvCacheFraction": "--gpu-memory-utilization",
    "maxBatchedTokens": "--max-num-batched-tokens",
}


def _execution_args(ex: Mapping[str, Any]) -> list[str]:
    """`spec.execution` -> `lorafleet worker` flags; the defaults (all graphs, async scheduling on a GPU) add none.

    asyncScheduling unset leaves the worker's own choice (on for a GPU, off on CPU); set, it is passed either way.
    """
    graphs = ex.get("cudaGraphs", "all")
    out = {"none": ["--enforce-eager"], "decode": ["--no-prefill-graphs"]}.get(graphs, [])
    if ex.get("asyncScheduling") is not None:
        out.append("--async-scheduling" if ex["asyncScheduling"] else "--no-async-scheduling")
    return out


def worker_container(bm: Body, adapter_root: str = c.DEFAULT_ADAPTER_ROOT) -> tuple[dict[str, Any], list[dict]]:
    """The worker container and the pod volumes it needs, for either engine (`podspec.py`: security, storage)."""
    spec = bm.get("spec") or {}
    name = bm["metadata"]["name"]
    wspec = spec.get("worker") or {}
    template = wspec.get("podTemplate") or {}
    limits = spec.get("limits") or {}
    port = worker_port(bm)
    engine = engine_of(bm)
    mount = model_mount(str((spec.get("source") or {}).get("uri", "")), engine)
    volumes, mounts = podspec.scratch_volumes(shm=True)
    volumes += [*mount.volumes]
    mounts += [*mount.mounts]
    for claim in sorted(set(wspec.get("claims") or [])):
        vol, mnt = podspec.claim_volume(claim)
        if all(v["name"] != vol["name"] for v in volumes):
            volumes.append(vol)
            mounts.append(mnt)
    env: list[dict[str, Any]] = podspec.cache_env()
    if engine == "vllm":
        image = wspec.get("image") or VLLM_IMAGE
        args = ["--model", mount.arg, *mount.extra_args, "--port", str(port), "--enable-lora"]
        args += ["--served-model-name", name]
        if spec.get("dtype"):
            args += ["--dtype", str(spec["dtype"])]
        args += _limit_args(limits, VLLM_LIMIT_FLAGS)
        if (spec.get("execution") or {}).get("cudaGraphs") == "none":
            args.append("--enforce-eager")
        # Dynamic LoRA loading only; no VLLM_API_KEY: in vLLM it guards every /v1 route, inference included. The
        # admin routes are guarded by the NetworkPolicy of docs/operator.md (vLLM engine) instead.
        env.append({"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"})
        command: list[str] = []
        probe_path = "/health"
        # the same drain as our workers: held up until the operator has moved every adapter away
        pre_stop: dict[str, Any] = podspec.vllm_drain_hook(port, DRAIN_WAIT_SECONDS)
    else:
        image = wspec.get("image") or WORKER_IMAGE
        command = ["lorafleet", "worker"]
        vol, mnt = podspec.adapter_store_volume(wspec, adapter_root)
        volumes.append(vol)
        mounts.append(mnt)
        # the worker's own training state (job registry, feedback log) is kept per pod in the shared adapter store
        env.append({"name": "LORAFLEET_WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
        args = ["--model", mount.arg, "--port", str(port), "--adapter-root", adapter_root]
        args += ["--claim-root", podspec.CLAIM_ROOT, "--source-cache", f"{podspec.CACHE_DIR}/sources"]
        args += ["--admin-token-file", f"{c.ADMIN_TOKEN_DIR}/{c.ADMIN_TOKEN_KEY}", "--served-model-name", name]
        if spec.get("dtype"):
            args += ["--dtype", str(spec["dtype"])]
        args += _limit_args(limits, LORAFLEET_LIMIT_FLAGS)
        args += _execution_args(spec.get("execution") or {})
        volumes.append({"name": "admin-token", "secret": {"secretName": admin_secret_name(name), "defaultMode": 0o440}})
        mounts.append({"name": "admin-token", "mountPath": c.ADMIN_TOKEN_DIR, "readOnly": True})
        probe_path = "/ready"
        wait = ["lorafleet", "drain-wait", "--port", str(port), "--timeout", str(DRAIN_WAIT_SECONDS)]
        wait += ["--admin-token-file", f"{c.ADMIN_TOKEN_DIR}/{c.ADMIN_TOKEN_KEY}"]
        pre_stop = {"exec": {"command": wait}}
    container: dict[str, Any] = {
        "name": "worker",
        "image": image,
        "args": args,
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "env": env,
        "volumeMounts": mounts,
        "resources": quantities(wspec.get("resources") or {}),
        **podspec.probes(probe_path),
        # SIGTERM only after the operator has moved every adapter away and the in-flight requests finished
        "lifecycle": {"preStop": pre_stop},
    }
    if command:
        container["command"] = command
    podspec.apply_container_template(container, template)
    return container, volumes


def quantities(resources: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Resource requirements with every quantity as a string (`nvidia.com/gpu: 1` arrives as an int)."""
    return {kind: {k: str(v) for k, v in (vals or {}).items()} for kind, vals in resources.items()}


def worker_deployment(bm: Body, adapter_root: str = c.DEFAULT_ADAPTER_ROOT) -> dict[str, Any]:
    spec = bm.get("spec") or {}
    meta = bm["metadata"]
    name = meta["name"]
    wspec = spec.get("worker") or {}
    template = wspec.get("podTemplate") or {}
    container, volumes = worker_container(bm, adapter_root)
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
    }
    init = model_mount(str((spec.get("source") or {}).get("uri", "")), engine_of(bm))
    if init.init_containers:
        pod_spec["initContainers"] = []
        for ic in init.init_containers:
            ic = dict(ic)
            podspec.apply_container_template(ic, {**template, "volumeMounts": None})
            ic["env"] = [*ic["env"], *[e for e in container["env"] if e["name"] not in {x["name"] for x in ic["env"]}]]
            pod_spec["initContainers"].append(ic)
    if wspec.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(wspec["nodeSelector"])
    if wspec.get("tolerations"):
        pod_spec["tolerations"] = [dict(t) for t in wspec["tolerations"]]
    podspec.apply_pod_template(pod_spec, template, worker_selector(name))
    labels = worker_labels(name)
    tmeta: dict[str, Any] = {"labels": {**(template.get("labels") or {}), **labels}}
    if template.get("annotations"):
        tmeta["annotations"] = dict(template["annotations"])
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": owned_metadata(bm, worker_name(name), labels),
        "spec": {
            "replicas": int(spec.get("replicas", 1)),
            "selector": {"matchLabels": worker_selector(name)},
            # One worker at a time, without a surge pod: a GPU worker replaced in place needs no spare GPU, and the
            # operator drains the old pod's adapters onto the others before it goes.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}},
            "template": {"metadata": tmeta, "spec": pod_spec},
        },
    }


def worker_service(bm: Body) -> dict[str, Any]:
    meta = bm["metadata"]
    port = worker_port(bm)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owned_metadata(bm, worker_name(meta["name"]), worker_labels(meta["name"])),
        "spec": {
            "selector": worker_selector(meta["name"]),
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def worker_pdb(bm: Body) -> dict[str, Any]:
    meta = bm["metadata"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": owned_metadata(bm, worker_name(meta["name"]), worker_labels(meta["name"])),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": worker_selector(meta["name"])}},
    }


def new_admin_token() -> str:
    return secrets.token_urlsafe(32)


def admin_secret(bm: Body, token: str) -> dict[str, Any]:
    """The per-BaseModel bearer token for the workers' admin API; created once, never rotated silently."""
    meta = bm["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": owned_metadata(bm, admin_secret_name(meta["name"]), worker_labels(meta["name"])),
        "stringData": {c.ADMIN_TOKEN_KEY: token},
    }


def adapter_route_labels(adapter: Body) -> dict[str, str]:
    meta = adapter["metadata"]
    bm = str((adapter.get("spec") or {}).get("baseModel", ""))
    return {
        c.LABEL_ADAPTER: dns_label(meta["name"]),
        c.LABEL_BASEMODEL: bm,
        c.LABEL_COMPONENT: c.COMPONENT_ROUTE,
        c.LABEL_MANAGED_BY: c.MANAGER,
    }


def adapter_service(adapter: Body, port: int) -> dict[str, Any]:
    """Headless Service with no selector: its endpoints are exactly what the operator writes to the slice."""
    meta = adapter["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owned_metadata(
            adapter,
            adapter_route_name(meta["name"]),
            adapter_route_labels(adapter),
            annotations={"lorafleet.io/adapter-name": meta["name"]},
        ),
        "spec": {
            "clusterIP": "None",
            "ports": [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


@dataclass(frozen=True)
class RouteTarget:
    """One ready pod that holds an adapter; `ip` is the pod IP (never loopback: the API server rejects it)."""

    pod: str
    ip: str
    node: str | None = None
    uid: str | None = None


def adapter_endpointslice(adapter: Body, port: int, targets: Iterable[RouteTarget]) -> dict[str, Any]:
    meta = adapter["metadata"]
    svc = adapter_route_name(meta["name"])
    endpoints = []
    for t in sorted(targets, key=lambda t: t.pod):
        ep: dict[str, Any] = {
            "addresses": [t.ip],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "targetRef": {"kind": "Pod", "name": t.pod, "namespace": meta.get("namespace")},
        }
        if t.uid:
            ep["targetRef"]["uid"] = t.uid
        if t.node:
            ep["nodeName"] = t.node
        endpoints.append(ep)
    labels = adapter_route_labels(adapter)
    labels["kubernetes.io/service-name"] = svc
    labels["endpointslice.kubernetes.io/managed-by"] = c.ENDPOINTSLICE_MANAGED_BY
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": owned_metadata(adapter, svc, labels),
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


def slice_pods(slice_body: Mapping[str, Any] | None) -> list[str]:
    """Pod names an EndpointSlice routes to (ready endpoints only)."""
    out = []
    for ep in (slice_body or {}).get("endpoints") or []:
        if (ep.get("conditions") or {}).get("ready", True) and ep.get("targetRef"):
            out.append(ep["targetRef"]["name"])
    return sorted(out)
