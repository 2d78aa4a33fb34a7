"""Where published continual-learning versions live in a store, and the manifest that makes a version complete.

Layout, under the adapter's store (its source URI, any `/versions/vN` suffix removed):

    <base>/versions/v<N>/adapter_model.safetensors, adapter_config.json, ...   the version's files
    <base>/versions/v<N>/lorafleet-manifest.json                              written last

The manifest lists every file with its size and SHA-256. Why a manifest written last: an S3 upload is one object at a
time, so a reader that lists a version while it is being uploaded sees some files and not others; the manifest
appears only after every file it names, so a version with a manifest is whole, and a reader of a `.../versions/vN`
URI refuses one without it (the adapter's current version keeps serving). The checksums inside it are what the
reader verifies, whatever the store's own ETags are. Pure functions, unit-tested without a store.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorafleet.worker.lora.sources.errors import SourceError
from lorafleet.worker.lora.sources.verify import sha256_file

MANIFEST = "lorafleet-manifest.json"
FORMAT = 1
VERSIONS_DIR = "versions"
_VERSION = re.compile(r"^(?P<base>.+?)/versions/v(?P<n>[1-9][0-9]{0,8})/?$")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def split_version(uri: str) -> tuple[str, int | None]:
    """(store base, version number) of a version URI; (uri, None) for anything else."""
    m = _VERSION.match(uri)
    if m is None:
        return uri.rstrip("/"), None
    return m["base"], int(m["n"])


def version_uri(base: str, n: int) -> str:
    return f"{base.rstrip('/')}/{VERSIONS_DIR}/v{int(n)}"


def is_version(uri: str) -> bool:
    """Whether `uri` names a published version (a reader then needs its manifest)."""
    return split_version(uri)[1] is not None


def version_files(local: Path) -> list[Path]:
    """The files of a version directory that are published: flat, data only, never a manifest found there."""
    return sorted(p for p in Path(local).iterdir() if p.is_file() and p.name != MANIFEST and _FILE.match(p.name))


def build_manifest(local: Path, version: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": int(version),
        "files": {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in version_files(local)},
    }


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def parse_manifest(uri: str, raw: bytes) -> dict[str, dict[str, Any]]:
    """The manifest's files ({name: {size, sha256}}), checked: hostile or damaged manifests are a SourceError."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(uri, f"{MANIFEST} is not JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        raise SourceError(uri, f"{MANIFEST} is not a format-{FORMAT} manifest")
    files: dict[str, dict[str, Any]] = {}
    for name, info in data["files"].items():
        if not isinstance(name, str) or not _FILE.match(name) or name == MANIFEST:
            raise SourceError(uri, f"{MANIFEST} names an invalid file {name!r}")
        size, digest = (info or {}).get("size"), (info or {}).get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not _SHA256.match(str(digest)):
            raise SourceError(uri, f"{MANIFEST}: {name} needs an integer size and a sha256")
        files[name] = {"size": size, "sha256": str(digest)}
    if not files:
        raise SourceError(uri, f"{MANIFEST} lists no files")
    return files


def check_against_manifest(uri: str, root: Path, files: Mapping[str, Mapping[str, Any]]) -> None:
    """Every file the manifest names is in `root` with its size and SHA-256 (what a reader loads is what was
    published, byte for byte)."""
    for name, info in files.items():
        p = root / name
        if not p.is_file():
            raise SourceError(uri, f"{name}: listed in {MANIFEST} but missing")
        if p.stat().st_size != info["size"]:
            raise SourceError(uri, f"{name}: {p.stat().st_size} bytes, {MANIFEST} says {info['size']}")
        if sha256_file(p) != info["sha256"]:
            raise SourceError(uri, f"{name}: checksum mismatch (sha256 differs from {MANIFEST})")


def incomplete(uri: str) -> SourceError:
    return SourceError(uri, f"version is not completely published ({MANIFEST} is missing); not loaded")
