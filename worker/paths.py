"""Containment of every file the worker reads or writes under a root, checked after following symlinks.

Why after resolving: a name check stops `..` in what a client sends, but a symlink planted inside a root (an adapter
directory whose `adapter_model.safetensors` points at `/etc/shadow`, or an adapter directory that is itself a link)
would still lead outside. Resolving first and comparing the real path with the real root catches both.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class PathEscape(ValueError):
    """A path that resolves outside every root it must stay in."""


def within(roots: Path | Iterable[Path], path: str | Path) -> Path:
    """The real path of `path` (symlinks followed, missing tail allowed) if it lies under one of `roots`."""
    candidates = [roots] if isinstance(roots, Path) else list(roots)
    real = Path(path).resolve()
    for root in candidates:
        if real.is_relative_to(Path(root).resolve()):
            return real
    raise PathEscape(f"{path} resolves to {real}, outside {[str(r) for r in candidates]}")


def entries_within(roots: Path | Iterable[Path], directory: Path) -> None:
    """Every entry of `directory` (its files are what an adapter load reads) must resolve under `roots`."""
    for entry in directory.iterdir():
        if entry.is_symlink():
            within(roots, entry)
