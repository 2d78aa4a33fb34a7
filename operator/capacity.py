"""What one worker can hold and what one adapter costs: the capacity side of placement.

Why not constants: the rebalancer once assumed 64 MiB per adapter and unlimited worker memory, so it happily packed
rank-256 adapters onto a worker whose budget held two. Sizes now come from what a worker reports for the adapter
(`size_bytes` in /v1/adapters, when the engine says it) or from the adapter's weight files (local sources; the
operator already reads adapter_config.json next to them), and the budget from the BaseModel's `spec.limits`.

One model for both placement paths: the rebalancer hands `worker_capacity` and `adapter_bytes` to the CP-SAT model,
and the fast path (assign.plan) asks `Capacity.fits` with the same numbers, in the same whole-KiB units the solver
uses (sizes rounded up, budgets down), so the fast path never places what the solver would call overfull.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lorafleet.operator.validation import adapter_path, is_local
from lorafleet.operator.workerclient import AdapterInfo

# Only when nothing is known (a remote source no worker has loaded yet): a rank-16 adapter on a 7B model in fp16.
DEFAULT_ADAPTER_BYTES = 64 * 1024 * 1024
UNLIMITED_BYTES = 1 << 62
UNLIMITED_SLOTS = 1_000_000
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
REPORTED_SIZE_KEYS = ("size_bytes", "bytes", "nbytes")
KIB = 1024  # the placement model's memory unit (operator/placement/problem.py)


def size_kib(nbytes: int) -> int:
    """An adapter's size in the solver's unit: whole KiB rounded up, at least 1 (nothing is free)."""
    return max(1, -(-int(nbytes) // KIB))


@dataclass(frozen=True)
class Capacity:
    """What one worker may hold: adapters (slots) and adapter-weight bytes (memory_bytes)."""

    slots: int = UNLIMITED_SLOTS
    memory_bytes: int = UNLIMITED_BYTES

    def fits(self, held_sizes: Iterable[int], size: int) -> bool:
        """Whether one more adapter of `size` bytes fits next to adapters of `held_sizes` bytes.

        Same rule as the CP-SAT model's capacity rows: count < slots and the KiB-rounded sizes sum within the
        KiB-rounded-down budget."""
        held = list(held_sizes)
        if len(held) + 1 > self.slots:
            return False
        return sum(size_kib(b) for b in held) + size_kib(size) <= self.memory_bytes // KIB


def worker_slots(limits: Mapping[str, Any]) -> int:
    """Adapters one worker can hold: its host cache (maxCpuAdapters) when set, else its GPU slots (maxAdapters).

    The engine keeps every loaded adapter in host memory and swaps maxAdapters of them onto the GPU per batch, so the
    host cache is the hard limit on what may be placed on a worker; maxAdapters is a lower bound on it."""
    cpu = int(limits.get("maxCpuAdapters") or 0)
    gpu = int(limits.get("maxAdapters") or 0)
    return max(cpu, gpu) or UNLIMITED_SLOTS


def worker_memory(limits: Mapping[str, Any]) -> int:
    """The adapter-weight budget of one worker in bytes (spec.limits.adapterMemoryBytes), unlimited when unset."""
    return int(limits.get("adapterMemoryBytes") or 0) or UNLIMITED_BYTES


def worker_capacity(limits: Mapping[str, Any]) -> Capacity:
    """One worker's capacity from the BaseModel's spec.limits (every worker of a BaseModel is alike)."""
    return Capacity(slots=worker_slots(limits), memory_bytes=worker_memory(limits))


def adapter_bytes(body: Mapping[str, Any], reported: Iterable[AdapterInfo] = ()) -> int:
    """Bytes of one adapter: the largest size a worker reports for it, else its weight files, else the default."""
    sizes = [int(info.extra[k]) for info in reported for k in REPORTED_SIZE_KEYS if info.extra.get(k)]
    if sizes:
        return max(sizes)
    uri = str(((body.get("spec") or {}).get("source") or {}).get("uri", ""))
    if is_local(uri):
        on_disk = weight_file_bytes(adapter_path(uri))
        if on_disk:
            return on_disk
    return DEFAULT_ADAPTER_BYTES


def adapter_sizes(
    bodies: Iterable[Mapping[str, Any]], reports: Iterable[Mapping[str, AdapterInfo] | None]
) -> dict[str, int]:
    """Bytes of every adapter in `bodies` by name, from what the workers report (`reports`: each worker's
    /v1/adapters by name) and else the files: the one size table both placement paths use."""
    by_name: dict[str, list[AdapterInfo]] = {}
    for report in reports:
        for name, info in (report or {}).items():
            by_name.setdefault(name, []).append(info)
    out = {}
    for body in bodies:
        name = str(body["metadata"]["name"])
        out[name] = adapter_bytes(body, by_name.get(name, ()))
    return out


def weight_file_bytes(path: str) -> int:
    """Total size of the weight files in an adapter directory (or of a single weight file); 0 when unreadable."""
    try:
        if os.path.isfile(path):
            return os.stat(path).st_size
        st = os.stat(path)
    except OSError:
        return 0
    return _dir_weight_bytes(path, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _dir_weight_bytes(path: str, _mtime: int) -> int:
    """Cached per (directory, mtime): the rebalancer asks every solve; a new file changes the directory's mtime."""
    total = 0
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_file() and entry.name.endswith(WEIGHT_SUFFIXES):
                    total += entry.stat().st_size
    except OSError:
        return 0
    return total
