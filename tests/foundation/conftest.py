"""Fixtures for the foundation tests: the CRDs installed into the session's real control plane."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorafleet.controlplane import ControlPlane
from lorafleet.controlplane.discovery import install_crds

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def crds_installed(cluster: ControlPlane) -> ControlPlane:
    """Applies crds/ (server-side, idempotent) and waits until every CRD is Established and its category resolves."""
    install_crds(cluster, REPO / "crds")
    return cluster


@pytest.fixture
def namespace(cluster: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test (deleted afterwards without waiting)."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower().removeprefix("test_"))[:40].strip("-")
    name = f"{stem}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
