"""`kubectl get lorafleet` (the CRDs' category) right after the CRDs are installed, with a discovery cache that
kubectl wrote before they existed: the failure `lorafleet up` once showed ("doesn't have a resource type lorafleet").

A fresh bare control plane, because the session cluster already serves the CRDs and cannot produce a stale cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.controlplane import ControlPlane
from lorafleet.controlplane.discovery import install_crds, served_resources
from lorafleet.local.samples import adapter, basemodel

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]
REPO = Path(__file__).resolve().parents[2]


def test_category_lists_every_kind_even_with_a_stale_discovery_cache(tmp_path: Path) -> None:
    cache = tmp_path / "kube-cache"
    with ControlPlane(tmp_path / "cp", quiet=True) as cp:
        # kubectl caches discovery without our group (what a user's kubectl did against this port earlier)
        cp.kubectl("api-resources", "-o", "name", f"--cache-dir={cache}")
        assert served_resources(cp, "lorafleet.io", "v1alpha1") == {}
        install_crds(cp, REPO / "crds", cache_dir=cache)
        served = served_resources(cp, "lorafleet.io", "v1alpha1")
        assert served == {p: ["lorafleet"] for p in ("basemodels", "loraadapters", "continuallearningjobs")}
        cp.kubectl("create", "namespace", "fleet")
        objects = [
            basemodel("tiny", "/models/tiny", replicas=0),
            adapter("ada", "tiny", "/adapters/ada"),
            adapter("bob", "tiny", "/adapters/bob"),
            {
                "apiVersion": "lorafleet.io/v1alpha1",
                "kind": "ContinualLearningJob",
                "metadata": {"name": "ada-cl"},
                "spec": {"adapter": "ada"},
            },
        ]
        for obj in objects:
            cp.request("POST", f"/apis/lorafleet.io/v1alpha1/namespaces/fleet/{_plural(obj['kind'])}", obj)
        got = cp.kubectl("get", "lorafleet", "-A", "-o", "name", f"--cache-dir={cache}")
        assert sorted(got.stdout.split()) == [
            "basemodel.lorafleet.io/tiny",
            "continuallearningjob.lorafleet.io/ada-cl",
            "loraadapter.lorafleet.io/ada",
            "loraadapter.lorafleet.io/bob",
        ]


def _plural(kind: str) -> str:
    return {"BaseModel": "basemodels", "LoRAAdapter": "loraadapters", "ContinualLearningJob": "continuallearningjobs"}[
        kind
    ]
