"""`pvc://CLAIM/PATH` sources: a directory inside a PersistentVolumeClaim the operator mounts read-only.

The operator mounts every claim a pool's adapters name at `<claim root>/<CLAIM>` (read-only); in local mode the
kubelet shim links each claim's directory there. A path is resolved (symlinks included) and must stay inside its
claim, so `pvc://a/../b/x` or a symlink out of the claim is refused. A published version (`layout.py`) must have its
manifest, and its files must match it.
"""

from __future__ import annotations

from pathlib import Path

from lorafleet.worker.lora.sources.errors import SourceError
from lorafleet.worker.lora.sources.layout import (
    MANIFEST,
    check_against_manifest,
    incomplete,
    is_version,
    parse_manifest,
)
from lorafleet.worker.lora.sources.uri import SourceRef
from lorafleet.worker.lora.sources.verify import check_tree

DEFAULT_CLAIM_ROOT = "/var/lib/lorafleet/claims"


class PVCSource:
    scheme = "pvc"

    def __init__(self, claim_root: str | Path = DEFAULT_CLAIM_ROOT) -> None:
        self.claim_root = Path(claim_root)

    def locate(self, ref: SourceRef) -> Path:
        claim = self.claim_root / ref.where
        if not claim.is_dir():
            raise SourceError(ref.uri, f"claim {ref.where!r} is not mounted on this worker (looked in {claim})")
        base = claim.resolve()
        path = (claim / ref.path).resolve()
        if not path.is_relative_to(base):
            raise SourceError(ref.uri, f"path resolves outside claim {ref.where!r}")
        if not path.exists():
            raise SourceError(ref.uri, f"{ref.path!r} does not exist in claim {ref.where!r}")
        return path

    def fetch(self, ref: SourceRef, kind: str) -> Path:
        path = self.locate(ref)
        if kind == "adapter" and not path.is_dir():
            raise SourceError(ref.uri, "is not a directory")
        if path.is_dir() and (is_version(ref.uri) or (path / MANIFEST).is_file()):
            if not (path / MANIFEST).is_file():
                raise incomplete(ref.uri)
            check_against_manifest(ref.uri, path, parse_manifest(ref.uri, (path / MANIFEST).read_bytes()))
        if path.is_dir():
            check_tree(ref.uri, path, kind)
        return path
