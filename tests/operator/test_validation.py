from __future__ import annotations

import json
from pathlib import Path

from lorafleet.operator.validation import adapter_path, adapter_rank, same_form, validate_adapter

BM = {"metadata": {"name": "m"}, "spec": {"limits": {"maxRank": 16}}}


def ad(uri: str, **spec: object) -> dict:
    return {"metadata": {"name": "a"}, "spec": {"baseModel": "m", "source": {"uri": uri}, **spec}}


def test_missing_basemodel() -> None:
    (p,) = validate_adapter(ad("/x"), None)
    assert p.reason == "BaseModelNotFound" and p.fatal and "'m'" in p.message


def test_missing_local_source_checked_only_when_asked(tmp_path: Path) -> None:
    missing = f"file://{tmp_path}/nope"
    assert [p.reason for p in validate_adapter(ad(missing), BM)] == ["SourceNotFound"]
    assert validate_adapter(ad(missing), BM, check_local_sources=False) == []
    assert validate_adapter(ad("hf://org/x"), BM) == []  # remote: the worker decides, reports its 400


def test_rank_from_spec_or_adapter_config(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 32}))
    assert adapter_rank(ad(str(tmp_path))) == 32
    (p,) = validate_adapter(ad(str(tmp_path)), BM)
    assert p.reason == "RankExceedsLimit" and "32" in p.message and "16" in p.message
    assert adapter_rank(ad(str(tmp_path), rank=8)) == 8  # spec.rank is what placement plans with
    assert [p.reason for p in validate_adapter(ad(str(tmp_path), rank=8), BM)] == ["LoadFailed"]  # but must match


def test_replicas_over_workers_is_soft(tmp_path: Path) -> None:
    (p,) = validate_adapter(ad(str(tmp_path), replicas={"min": 3}), BM, workers=2)
    assert p.reason == "ReplicasExceedWorkers" and not p.fatal


def test_adapter_path() -> None:
    assert adapter_path("file:///a/b") == "/a/b" and adapter_path("s3://b/k") == "s3://b/k"


def test_spec_rank_that_differs_from_the_weights_fails_naming_both(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (p,) = validate_adapter(ad(str(tmp_path), rank=4), BM)
    assert (p.reason, p.fatal) == ("LoadFailed", True)
    assert "spec.rank is 4" in p.message and "rank 8" in p.message
    assert validate_adapter(ad(str(tmp_path), rank=8), BM) == []
    # a remote source: the rank a worker reported after loading it decides
    (q,) = validate_adapter(ad("hf://org/x", rank=4), BM, observed_rank=16)
    assert "spec.rank is 4" in q.message and "rank 16" in q.message
    assert validate_adapter(ad("hf://org/x", rank=4), BM) == []


def test_version_pin_must_name_a_published_version() -> None:
    pinned = ad("hf://org/x", version="3")
    (p,) = validate_adapter(pinned, BM)
    assert (p.reason, p.fatal) == ("VersionNotFound", True) and "spec.version 3" in p.message and "none" in p.message
    pinned["metadata"]["annotations"] = {"lorafleet.io/published-versions": json.dumps({"1": "/v/1", "2": "/v/2"})}
    (p,) = validate_adapter(pinned, BM)
    assert "published: 1, 2" in p.message
    pinned["spec"]["version"] = "2"
    assert validate_adapter(pinned, BM) == []


def test_pvc_sources_go_to_the_worker_and_need_a_mounted_claim() -> None:
    assert adapter_path("pvc://adapters/llama/sql", "/mnt/a/") == "pvc://adapters/llama/sql"
    (p,) = validate_adapter(ad("pvc://adapters/llama/sql"), BM)
    assert p.reason == "ClaimNotMounted" and p.fatal
    assert "pvc://adapters/llama/sql" in p.message and "spec.worker.claims" in p.message
    mounted = {**BM, "spec": {**BM["spec"], "worker": {"claims": ["adapters"]}}}
    assert validate_adapter(ad("pvc://adapters/llama/sql"), mounted) == []
    model_claim = {**BM, "spec": {**BM["spec"], "source": {"uri": "pvc://adapters/base"}}}
    assert validate_adapter(ad("pvc://adapters/llama/sql"), model_claim) == []


def test_same_form_normalises_paths_and_keeps_uris() -> None:
    """A store URI is compared and rolled out as it is: `s3:/b/k` (what normpath makes of it) is a local path."""
    assert same_form("s3://adapters/tenants/a/versions/v2") == "s3://adapters/tenants/a/versions/v2"
    assert same_form("pvc://claim//a/../b") == "pvc://claim//a/../b"
    assert same_form("/var/lib//adapters/a/../b/") == "/var/lib/adapters/b"
