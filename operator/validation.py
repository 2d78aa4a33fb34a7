"""Checks a LoRAAdapter against its BaseModel before anything is loaded; pure so every reason is unit-tested.

Fatal problems stop placement (the adapter could never serve correctly); soft ones (more replicas than workers)
let it serve with what exists and mark it Degraded, so a user sees the shortfall instead of a silent cap.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lorafleet.operator import constants as c


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str
    fatal: bool = True


def adapter_path(uri: str, adapter_root: str = "/var/lib/lorafleet/adapters") -> str:
    """What the worker's load API gets as `lora_path`: a filesystem path for file:// URIs; pvc://, s3:// and hf://
    URIs go to the worker as they are (it resolves them, `docs/stores.md`). `adapter_root` is kept for callers."""
    del adapter_root
    if uri.startswith("file://"):
        return uri[len("file://") :]
    return uri


def same_form(location: str) -> str:
    """A `lora_path` in the form two equal locations share: filesystem paths normalised (`a//b/../c` is `a/c`),
    URIs as they are: `os.path.normpath` folds `s3://b/k` into `s3:/b/k`, which a worker reads as a local path and
    refuses (400), so a store's version could never be rolled out to another replica."""
    return location if "://" in location else os.path.normpath(location)


def unmounted_claim(uri: str, basemodel: Mapping[str, Any]) -> str | None:
    """The claim of a pvc:// source that the BaseModel's workers do not mount, or None."""
    if not uri.startswith("pvc://"):
        return None
    claim = uri[len("pvc://") :].split("/", 1)[0]
    spec = basemodel.get("spec") or {}
    mounted = set((spec.get("worker") or {}).get("claims") or [])
    model = str((spec.get("source") or {}).get("uri", ""))
    if model.startswith("pvc://"):
        mounted.add(model[len("pvc://") :].split("/", 1)[0])
    return None if claim in mounted else claim


def is_local(uri: str) -> bool:
    return uri.startswith("file://") or uri.startswith("/")


def adapter_rank(adapter: Mapping[str, Any], path_exists: Callable[[str], bool] = os.path.exists) -> int | None:
    """Rank from spec.rank, else from adapter_config.json next to a local source (so limits hold without it)."""
    spec = adapter.get("spec") or {}
    if spec.get("rank"):
        return int(spec["rank"])
    return source_rank(adapter, path_exists)


def source_rank(adapter: Mapping[str, Any], path_exists: Callable[[str], bool] = os.path.exists) -> int | None:
    """The rank the adapter's own adapter_config.json states, for a local source the operator can read."""
    spec = adapter.get("spec") or {}
    uri = str((spec.get("source") or {}).get("uri", ""))
    if is_local(uri):
        cfg = os.path.join(adapter_path(uri), "adapter_config.json")
        if path_exists(cfg):
            try:
                return _config_rank(cfg, os.stat(cfg).st_mtime_ns)
            except OSError:
                return None
    return None


@functools.lru_cache(maxsize=4096)
def _config_rank(path: str, _mtime: int) -> int | None:
    """Cached per (file, mtime): the fleet asks every cycle, the file rarely changes."""
    import json

    try:
        with open(path) as fh:
            return int(json.load(fh).get("r") or 0) or None
    except (OSError, ValueError):
        return None


def validate_adapter(
    adapter: Mapping[str, Any],
    basemodel: Mapping[str, Any] | None,
    *,
    workers: int | None = None,
    check_local_sources: bool = True,
    path_exists: Callable[[str], bool] = os.path.exists,
    observed_rank: int | None = None,
) -> list[Problem]:
    """Every problem of `adapter`. `observed_rank` is the rank a worker reported after loading it (the only way to
    learn the rank of a remote source); a local source's adapter_config.json is read directly."""
    spec = adapter.get("spec") or {}
    problems: list[Problem] = []
    bm_name = spec.get("baseModel")
    if basemodel is None:
        problems.append(Problem("BaseModelNotFound", f"BaseModel {bm_name!r} does not exist in this namespace"))
        return problems
    uri = str((spec.get("source") or {}).get("uri", ""))
    if not uri:
        problems.append(Problem("SourceMissing", "spec.source.uri is empty"))
    elif check_local_sources and is_local(uri) and not path_exists(adapter_path(uri)):
        problems.append(Problem("SourceNotFound", f"adapter source {uri} does not exist (checked from the operator)"))
    elif (claim := unmounted_claim(uri, basemodel)) is not None:
        problems.append(
            Problem(
                "ClaimNotMounted",
                f"adapter source {uri}: claim {claim!r} is not mounted by BaseModel {bm_name}; add it to "
                "spec.worker.claims",
            )
        )
    max_rank = ((basemodel.get("spec") or {}).get("limits") or {}).get("maxRank")
    rank = adapter_rank(adapter, path_exists) if not problems else spec.get("rank")
    if max_rank and rank and int(rank) > int(max_rank):
        problems.append(
            Problem("RankExceedsLimit", f"adapter rank {rank} exceeds BaseModel {bm_name} limits.maxRank {max_rank}")
        )
    want = spec.get("rank")
    actual = observed_rank
    if actual is None and check_local_sources and is_local(uri) and not problems:
        actual = source_rank(adapter, path_exists)
    if want and actual and int(want) != int(actual):
        problems.append(
            Problem("LoadFailed", f"spec.rank is {want} but the adapter's weights at {uri} have rank {actual}")
        )
    pin = spec.get("version")
    if pin:
        published = published_versions(adapter)
        if str(pin) not in published:
            known = ", ".join(sorted(published, key=_version_key)) or "none"
            problems.append(
                Problem("VersionNotFound", f"spec.version {pin} is not a published version (published: {known})")
            )
    rep = spec.get("replicas") or {}
    asked = rep if isinstance(rep, int) else int(rep.get("min") or 1)
    if workers is not None and asked > workers:
        problems.append(
            Problem(
                "ReplicasExceedWorkers",
                f"{asked} replicas requested but BaseModel {bm_name} runs {workers} worker(s)",
                fatal=False,
            )
        )
    return problems


def _version_key(v: str) -> tuple[int, str]:
    return (int(v), v) if v.isdigit() else (1 << 62, v)


def published_versions(adapter: Mapping[str, Any]) -> dict[str, str]:
    """version -> weights path of every version a ContinualLearningJob published for this adapter (annotation
    `lorafleet.io/published-versions`, JSON); empty when none was published or the annotation is unreadable."""
    import json

    raw = ((adapter.get("metadata") or {}).get("annotations") or {}).get(c.ANNOT_PUBLISHED_VERSIONS)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
