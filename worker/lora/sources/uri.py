"""Parsing of source URIs into their parts; pure, so every accepted and refused form is unit-tested."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorafleet.worker.lora.sources.errors import SourceError

REMOTE_SCHEMES = ("s3", "hf")
_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class SourceRef:
    """A parsed source: `scheme` plus `where` (bucket, repo id or claim) and `path` (key prefix or path inside)."""

    uri: str
    scheme: str
    where: str
    path: str = ""
    revision: str | None = None


def scheme_of(uri: str) -> str:
    """The URI's scheme, "" for a plain path (one-letter "schemes" are drive letters, not schemes)."""
    head, sep, _ = uri.partition("://")
    return head.lower() if sep and len(head) > 1 else ""


def is_remote(uri: str) -> bool:
    return scheme_of(uri) in REMOTE_SCHEMES


def parse(uri: str) -> SourceRef:
    """Splits `s3://bucket/prefix`, `hf://org/repo[@revision]` and `pvc://claim/path`."""
    scheme = scheme_of(uri)
    rest = uri.split("://", 1)[1] if scheme else uri
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not _BUCKET.match(bucket):
            raise SourceError(uri, f"invalid bucket name {bucket!r}")
        return SourceRef(uri, "s3", bucket, key.strip("/"))
    if scheme == "hf":
        repo_part, at, revision = rest.partition("@")
        org, _, repo = repo_part.partition("/")
        if not (_HF_PART.match(org) and _HF_PART.match(repo)):
            raise SourceError(uri, "expected hf://<org>/<repo>[@revision]")
        if at and (not revision or ".." in revision.split("/")):
            raise SourceError(uri, f"invalid revision {revision!r}")
        return SourceRef(uri, "hf", f"{org}/{repo}", "", revision or None)
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        if not _CLAIM.match(claim):
            raise SourceError(uri, f"invalid claim name {claim!r}")
        return SourceRef(uri, "pvc", claim, path.strip("/"))
    if scheme == "file":
        return SourceRef(uri, "file", "", rest)
    if scheme:
        raise SourceError(uri, f"unsupported scheme {scheme}://")
    return SourceRef(uri, "file", "", uri)
