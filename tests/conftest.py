"""Shared fixtures: a real Kubernetes control plane for every test that asks for one.

`cluster` starts (once per session, lazily: only if a selected test requests it) etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and KWOK with three fake GPU nodes (`kwok-gpu-0..2`, 8 `nvidia.com/gpu`
each), so Deployments really produce Running pods with IPs. It yields a `lorafleet.controlplane.ControlPlane`
(`.kubeconfig`, `.server`, `.kubectl(...)`, `.helm(...)`, `.request(...)`); the processes are stopped at session end,
on failure and on interruption. `k8s_api` is a `kubernetes.client.ApiClient` logged in as cluster admin.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from kubernetes.client import ApiClient

from lorafleet.controlplane import ControlPlane

# Several engineers' test runs share a few cores: keep math libraries from spawning a thread per core.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

CLUSTER_NODES = 3
GPUS_PER_NODE = 8


@pytest.fixture(scope="session")
def cluster() -> Iterator[ControlPlane]:
    cp = ControlPlane(controllers=True, kwok=True, kwok_nodes=CLUSTER_NODES, gpus_per_node=GPUS_PER_NODE)
    try:
        cp.start()
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def k8s_api(cluster: ControlPlane) -> Iterator[ApiClient]:
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    try:
        yield api
    finally:
        api.close()
