from __future__ import annotations

import json
from pathlib import Path

from lorafleet.operator.validation import adapter_path, adapter_rank, validate_adapter

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
    assert validate_adapter(ad(str(tmp_path), rank=8), BM) == []


def test_replicas_over_workers_is_soft(tmp_path: Path) -> None:
    (p,) = validate_adapter(ad(str(tmp_path), replicas={"min": 3}), BM, workers=2)
    assert p.reason == "ReplicasExceedWorkers" and not p.fatal


def test_adapter_path() -> None:
    assert adapter_path("file:///a/b") == "/a/b" and adapter_path("s3://b/k") == "s3://b/k"


def test_pvc_sources_map_under_the_adapter_root() -> None:
    assert adapter_path("pvc://adapters/llama/sql", "/mnt/a/") == "/mnt/a/adapters/llama/sql"
