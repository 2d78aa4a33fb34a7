"""Fixtures for the operator suite: a control plane with controllers + KWOK GPU nodes, a tiny model with adapters,
and a `LocalFleet` (kubelet shim + operator subprocess) in a fresh namespace.

Uses the session fixture `cluster` from tests/conftest.py when it runs controllers and KWOK; otherwise starts one
(once per session) with `lorafleet.controlplane.ControlPlane`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def op_cluster(request: pytest.FixtureRequest) -> Iterator[object]:
    try:
        cp = request.getfixturevalue("cluster")
    except pytest.FixtureLookupError:
        cp = None
    if cp is not None and getattr(cp, "kwok", False) and getattr(cp, "controllers", False):
        yield cp
        return
    from lorafleet.controlplane.cluster import ControlPlane

    with ControlPlane(controllers=True, kwok=True, kwok_nodes=3, quiet=True) as own:
        yield own


@pytest.fixture(scope="session")
def crds(op_cluster: object) -> None:
    from lorafleet.controlplane.discovery import install_crds

    install_crds(op_cluster, ROOT / "crds")


@pytest.fixture(scope="session")
def admission(op_cluster: object) -> None:
    """The operator's ValidatingAdmissionPolicy (manifests/admission/): every fleet test runs under it, so a write the
    policy would refuse fails the test that makes it."""
    op_cluster.kubectl("apply", "--server-side", "-k", str(ROOT / "manifests" / "admission"))  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama and four PEFT adapters (ranks 4, 8, 16 and 32) built in code."""
    import torch
    from lorafleet.worker.testing import build_peft_adapter, build_tiny_llama

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("assets")
    model = build_tiny_llama(root / "model")
    out: dict[str, Path] = {"model": model, "adapters": root / "adapters"}
    for i, rank in enumerate((4, 8, 16, 32)):
        out[f"r{rank}"] = build_peft_adapter(root / "adapters" / f"r{rank}", model, rank=rank, seed=i + 1)
    return out


@pytest.fixture(scope="module")
def fleet(
    op_cluster: object,
    crds: None,
    admission: None,
    tiny_assets: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
):
    from lorafleet.local.harness import LocalFleet, service_account_kubeconfig

    ns = f"op-{uuid.uuid4().hex[:6]}"
    state = tmp_path_factory.mktemp("fleet")
    # The operator runs as the manifests' ServiceAccount with the manifests' ClusterRole: least privilege, tested live.
    sa_kubeconfig = service_account_kubeconfig(op_cluster.kubeconfig, state / "operator.kubeconfig", ROOT / "manifests")  # type: ignore[attr-defined]
    lf = LocalFleet(
        op_cluster.kubeconfig,  # type: ignore[attr-defined]
        ns,
        state,
        operator_kubeconfig=sa_kubeconfig,
        adapter_root=str(tiny_assets["adapters"]),
        operator_args=["--interval", "0.5", "--drain-grace", "0.5", "--rebalance-interval", "0"],
        worker_extra_args=["--max-num-seqs", "8", "--kv-cache-bytes", str(16 << 20)],
    )
    lf.ensure_namespace()
    lf.start_shim()
    lf.start_operator()
    try:
        yield lf
    finally:
        log = lf.operator_log()
        lf.close()
        if os.environ.get("LORAFLEET_TEST_LOGS"):
            print(log[-20000:])
