"""Fake GPU nodes for KWOK: Node objects that KWOK adopts (by annotation) and keeps Ready, so the scheduler places
pods on them and KWOK moves those pods to Running with an IP from the node's pod CIDR. Nothing ever runs."""

from __future__ import annotations

from typing import Any

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_SELECTOR = f"{KWOK_ANNOTATION}=fake"
POD_CIDR = "10.244.0.0/16"
GPU_RESOURCE = "nvidia.com/gpu"


def fake_gpu_node(index: int, gpus: int = 8, cpu: str = "64", memory: str = "512Gi", pods: int = 110) -> dict[str, Any]:
    """Node `kwok-gpu-<index>` with `gpus` devices of `nvidia.com/gpu`, labelled like a GPU-operator node."""
    name = f"kwok-gpu-{index}"
    resources = {"cpu": cpu, "memory": memory, "pods": str(pods), GPU_RESOURCE: str(gpus), "ephemeral-storage": "1Ti"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node-role.kubernetes.io/gpu": "",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                "nvidia.com/gpu.count": str(gpus),
            },
        },
        "spec": {"podCIDR": f"10.244.{index}.0/24", "podCIDRs": [f"10.244.{index}.0/24"]},
        "status": {
            # A distinct, routable-looking InternalIP per node: pods report it as hostIP, and EndpointSlice
            # validation rejects loopback and link-local addresses.
            "addresses": [
                {"type": "InternalIP", "address": f"10.243.0.{index + 10}"},
                {"type": "Hostname", "address": name},
            ],
            "capacity": resources,
            "allocatable": resources,
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "fake",
                "kubeProxyVersion": "fake",
                "containerRuntimeVersion": "kwok",
            },
        },
    }
