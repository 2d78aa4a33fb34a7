"""The worker pod's security, storage and scheduling defaults, and the BaseModel's `spec.worker.podTemplate` over them.

Why defaults that pass Pod Security `restricted`: workers run tenants' adapters next to GPUs, so a worker pod runs as
a non-root user with no capabilities, no privilege escalation, the runtime's seccomp profile and a read-only root
filesystem; everything it writes goes to emptyDirs (`/cache` for downloads and compiled kernels, `/tmp`, `/dev/shm`)
or to the volumes the spec names. A hostPath appears only where the spec asks for one (a `file://` model, or
`adapterStore.hostPath`). Claims (`pvc://` sources) are mounted read-only under `CLAIM_ROOT`. Pure functions: dicts
in, dicts out.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

CLAIM_ROOT = "/var/lib/lorafleet/claims"
CACHE_DIR = "/cache"
WORKER_UID = 65532
# A model that loads for a long time (an 8B download + load) must not be restarted by its liveness probe: the
# startup probe allows this long before liveness takes over.
STARTUP_SECONDS = 1800


def pod_security_context(template: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": WORKER_UID,
        "runAsGroup": WORKER_UID,
        "fsGroup": WORKER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    out.update(copy.deepcopy(dict(template.get("securityContext") or {})))
    return out


def container_security_context(template: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    out.update(copy.deepcopy(dict(template.get("containerSecurityContext") or {})))
    return out


def claim_volume(claim: str, read_only: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume, mount) of a claim at CLAIM_ROOT/<claim>, read-only unless asked otherwise."""
    name = f"claim-{claim}"[:63].rstrip("-")
    vol = {"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}
    mnt = {"name": name, "mountPath": f"{CLAIM_ROOT}/{claim}", "readOnly": read_only}
    return vol, mnt


def scratch_volumes(shm: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """emptyDirs for everything a read-only root filesystem cannot hold."""
    vols = [{"name": "cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "cache", "mountPath": CACHE_DIR}, {"name": "tmp", "mountPath": "/tmp"}]
    if shm:  # NCCL and torch's shared-memory tensors; the runtime's default /dev/shm is 64 MiB
        vols.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return vols, mounts


def adapter_store_volume(wspec: Mapping[str, Any], adapter_root: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The adapter root: a ReadWriteMany claim or an opted-in hostPath when the spec names one, else an emptyDir."""
    store = wspec.get("adapterStore") or {}
    if store.get("claimName"):
        vol: dict[str, Any] = {"name": "adapters", "persistentVolumeClaim": {"claimName": store["claimName"]}}
    elif store.get("hostPath"):
        vol = {"name": "adapters", "hostPath": {"path": store["hostPath"], "type": "DirectoryOrCreate"}}
    else:
        vol = {"name": "adapters", "emptyDir": {}}
    return vol, {"name": "adapters", "mountPath": adapter_root}


def cache_env() -> list[dict[str, Any]]:
    """Where libraries write caches, all inside the /cache emptyDir (the root filesystem is read-only)."""
    return [
        {"name": "HOME", "value": "/tmp"},
        {"name": "LORAFLEET_CACHE", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_DIR}/triton"},
        {"name": "XDG_CACHE_HOME", "value": f"{CACHE_DIR}/xdg"},
    ]


def merge_named(base: list[dict[str, Any]], extra: list[Mapping[str, Any]] | None, key: str = "name") -> list[dict]:
    """`base` with `extra` entries added; an extra entry with a base entry's name replaces it (user wins)."""
    out = {e[key]: e for e in base}
    for e in extra or []:
        out[str(e[key])] = copy.deepcopy(dict(e))
    return list(out.values())


def spread_constraints(selector: Mapping[str, str], template: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Workers of one BaseModel on distinct nodes where the cluster allows it (one node lost = one replica)."""
    if template.get("topologySpreadConstraints") is not None:
        return copy.deepcopy(list(template["topologySpreadConstraints"]))
    return [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": dict(selector)},
        }
    ]


def probes(probe_path: str) -> dict[str, Any]:
    """Startup probe sized for model loading; readiness on `probe_path`; liveness on /health once started."""
    return {
        "startupProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": STARTUP_SECONDS // 10,
        },
        "readinessProbe": {"httpGet": {"path": probe_path, "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "failureThreshold": 6},
    }


# Stock vLLM's drain: its image has no `lorafleet drain-wait`, but it has Python. Like drain-wait, the hook returns
# once the server lists no LoRA adapter in /v1/models (every entry with a `parent` is one), when it stops answering,
# or after the timeout, so SIGTERM reaches a vLLM process only after the operator has moved its adapters away.
VLLM_DRAIN_SCRIPT = """import json, sys, time, urllib.request
port, end = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
            models = json.load(r).get("data") or []
    except Exception:
        break
    if not any(m.get("parent") for m in models):
        break
    time.sleep(0.5)
"""


def vllm_drain_hook(port: int, timeout_s: int) -> dict[str, Any]:
    """The preStop hook of a stock vLLM container: waits until it holds no adapter (at most `timeout_s`)."""
    return {"exec": {"command": ["python3", "-c", VLLM_DRAIN_SCRIPT, str(port), str(timeout_s)]}}


def apply_pod_template(pod_spec: dict[str, Any], template: Mapping[str, Any], selector: Mapping[str, str]) -> None:
    """Merges `spec.worker.podTemplate`'s pod-level fields into the pod spec (in place)."""
    pod_spec["securityContext"] = pod_security_context(template)
    pod_spec["topologySpreadConstraints"] = spread_constraints(selector, template)
    for field in ("serviceAccountName", "priorityClassName", "runtimeClassName", "automountServiceAccountToken"):
        if template.get(field) is not None:
            pod_spec[field] = template[field]
    if template.get("imagePullSecrets"):
        pod_spec["imagePullSecrets"] = [{"name": s["name"]} for s in template["imagePullSecrets"]]
    if template.get("nodeSelector"):
        pod_spec["nodeSelector"] = {**pod_spec.get("nodeSelector", {}), **template["nodeSelector"]}
    if template.get("affinity"):
        pod_spec["affinity"] = copy.deepcopy(dict(template["affinity"]))
    if template.get("tolerations"):
        pod_spec["tolerations"] = [*pod_spec.get("tolerations", []), *copy.deepcopy(list(template["tolerations"]))]
    pod_spec["volumes"] = merge_named(pod_spec.get("volumes", []), template.get("volumes"))


def apply_container_template(container: dict[str, Any], template: Mapping[str, Any]) -> None:
    container["securityContext"] = container_security_context(template)
    container["env"] = merge_named(container.get("env", []), template.get("env"))
    container["volumeMounts"] = merge_named(
        container.get("volumeMounts", []), template.get("volumeMounts"), key="mountPath"
    )
