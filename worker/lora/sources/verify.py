"""Checks on downloaded weights before anything reads them: which files may come, and that each one is whole.

Why here and not only in the adapter reader: a source is verified in its temporary directory, before the rename that
makes it visible, so a truncated or tampered file is never in the cache at all. Pickle-based formats (`.bin`, `.pt`,
...) execute code when loaded, so they are never downloaded; a source that offers only those is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

from lorafleet.worker.lora.sources.errors import SourceError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
# Files that are data, never code: configs, tokenizers, safetensors, GGUF, docs.
DATA_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".gguf", ".md", ".jinja", ".tiktoken")
MAX_HEADER_BYTES = 100 << 20
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def select_files(uri: str, names: Iterable[str], kind: str) -> list[str]:
    """The files of a source worth downloading: data files only; refuses a source whose weights are all pickle.

    `kind` is "adapter" (needs adapter_config.json + adapter_model.safetensors) or "model" (config.json + at
    least one .safetensors or a .gguf)."""
    names = sorted(set(names))
    unsafe = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    keep = [n for n in names if n.lower().endswith(DATA_SUFFIXES) and not n.startswith(".")]
    weights = [n for n in keep if n.endswith((".safetensors", ".gguf"))]
    if kind == "adapter":
        keep = [n for n in keep if "/" not in n]  # an adapter is one flat directory
        if "adapter_model.safetensors" not in keep:
            if unsafe:
                raise SourceError(uri, f"only pickle weights ({', '.join(unsafe[:3])}); refusing to unpickle")
            raise SourceError(uri, "adapter_model.safetensors not found")
        if "adapter_config.json" not in keep:
            raise SourceError(uri, "adapter_config.json not found")
    else:
        if not weights:
            if unsafe:
                raise SourceError(uri, f"only pickle weights ({', '.join(unsafe[:3])}); refusing to unpickle")
            raise SourceError(uri, "no .safetensors or .gguf weights found")
        if not any(n.endswith(".gguf") for n in weights) and "config.json" not in keep:
            raise SourceError(uri, "config.json not found")
    return keep


def check_safetensors(uri: str, path: Path) -> int:
    """Validates a safetensors file's structure without loading it; returns its tensor count.

    The header must be JSON, every tensor's byte range must match its dtype x shape, the ranges must tile the data
    section exactly and the file must end where the last tensor does: a truncated or padded file fails here."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SourceError(uri, f"{path.name}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SourceError(uri, f"{path.name}: safetensors header of {n} bytes does not fit a {size}-byte file")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(uri, f"{path.name}: safetensors header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise SourceError(uri, f"{path.name}: safetensors header is not an object")
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            want = math.prod(int(d) for d in shape) * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(uri, f"{path.name}: tensor {key!r} has a malformed header entry") from exc
        if end - begin != want or begin < 0:
            raise SourceError(uri, f"{path.name}: tensor {key!r} {dtype}{shape} spans {end - begin} bytes, not {want}")
        spans.append((begin, end))
    spans.sort()
    pos = 0
    for begin, end in spans:
        if begin != pos:
            raise SourceError(uri, f"{path.name}: tensor data is not contiguous at byte {begin}")
        pos = end
    if 8 + n + pos != size:
        raise SourceError(uri, f"{path.name}: file has {size} bytes, its header describes {8 + n + pos}")
    return len(spans)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file (what the hub reports for files not stored in LFS)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_tree(uri: str, root: Path, kind: str) -> None:
    """Every safetensors file under `root` is whole, and no pickle file is there."""
    for p in root.rglob("*"):
        if p.is_file() and p.name.lower().endswith(PICKLE_SUFFIXES):
            raise SourceError(uri, f"{p.relative_to(root)}: pickle file in the source; refusing")
        if p.is_file() and p.name.endswith(".safetensors"):
            check_safetensors(uri, p)
    select_files(uri, [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()], kind)
