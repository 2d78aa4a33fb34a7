"""Durable writes: the one way the worker makes a file survive a crash (write, fsync, rename, fsync the directory).

Why one helper: feedback records, training checkpoints and persisted job specs each promise that what was
acknowledged is on disk; a rename is only durable once the directory holding it is fsynced, and a file only once its
own bytes are, so every writer does the same four steps in the same order.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flushes a file's or a directory's entries to disk."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Writes `data` to `path` and fsyncs it (the caller renames or fsyncs the directory)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def replace_durably(src: Path, dst: Path) -> None:
    """Renames `src` (a synced file or directory) over `dst` and fsyncs the directory, so the rename survives."""
    os.replace(src, dst)
    fsync_path(dst.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """`path` holds either its old bytes or `data` after a crash, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_synced(tmp, data)
    replace_durably(tmp, path)
