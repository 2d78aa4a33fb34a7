"""A bounded local cache of downloaded sources, one directory per (source, version).

Why this shape: a version directory appears only by `os.replace` of a fully downloaded and verified temporary
directory, so a reader sees a whole version or none. The temporary directory is kept per key between attempts, so
an interrupted download resumes where it stopped. Keys carry the source's version (S3 ETags, the hub's commit), so
a changed source is a new entry and never overwrites one that a worker may be reading. When the cache grows past
`max_bytes`, the least recently used entries go first, never a protected one (a version a worker serves).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass(frozen=True)
class CacheKey:
    """(scheme, source URI, version): the directory name is derived from all three."""

    scheme: str
    uri: str
    version: str

    @property
    def relpath(self) -> str:
        src = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        return f"{self.scheme}/{src}/{_SAFE.sub('_', self.version)[:80]}"


class SourceCache:
    def __init__(self, root: str | Path, max_bytes: int = 20 << 30) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def path(self, key: CacheKey) -> Path:
        return self.root / key.relpath

    def lookup(self, key: CacheKey) -> Path | None:
        """The entry's directory if it is complete; marks it used."""
        final = self.path(key)
        if final.is_dir():
            os.utime(final)
            return final
        return None

    def partial(self, key: CacheKey) -> Path:
        """Where a download of `key` is written; kept across attempts so a retry resumes."""
        p = self.root / ".partial" / key.relpath
        p.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self, key: CacheKey, partial: Path) -> Path:
        """Makes a verified download visible (atomic rename) and returns its directory."""
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(partial, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(partial, ignore_errors=True)  # another process committed the same version first
        os.utime(final)
        return final

    def discard(self, key: CacheKey) -> None:
        """Drops a partial download that failed verification (a retry starts from nothing)."""
        shutil.rmtree(self.root / ".partial" / key.relpath, ignore_errors=True)

    @contextmanager
    def locked(self, key: CacheKey) -> Iterator[None]:
        """One download of a key at a time, across threads and processes sharing the cache."""
        rel = key.relpath
        with self._guard:
            tlock = self._locks.setdefault(rel, threading.Lock())
        lock_dir = self.root / ".locks"
        lock_dir.mkdir(exist_ok=True)
        with tlock, open(lock_dir / hashlib.sha256(rel.encode()).hexdigest()[:24], "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def entries(self) -> list[Path]:
        return [
            v for s in self.root.iterdir() if not s.name.startswith(".") for src in s.iterdir() for v in src.iterdir()
        ]

    def size_bytes(self) -> int:
        return sum(tree_bytes(e) for e in self.entries())

    def evict(self, protected: Collection[Path] = ()) -> list[Path]:
        """Removes least recently used entries until the cache fits `max_bytes`; returns what it removed."""
        keep = {Path(p).resolve() for p in protected}
        sized = [(e.stat().st_mtime, tree_bytes(e), e) for e in self.entries()]
        total = sum(s for _, s, _ in sized)
        removed = []
        for _, size, entry in sorted(sized):
            if total <= self.max_bytes:
                break
            if entry.resolve() in keep:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            total -= size
            removed.append(entry)
            log.info("source cache: evicted %s (%d bytes)", entry, size)
        if total > self.max_bytes:
            log.warning("source cache holds %d bytes over its %d-byte bound (all of it in use)", total, self.max_bytes)
        return removed
