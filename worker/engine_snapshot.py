"""What HTTP handlers may read of the engine without touching it: a snapshot the engine thread copies, and how it
becomes metrics.

Why a copy: `LLMEngine` belongs to one thread (async_engine.py); `/v1/models`, `/v1/adapters` and the Prometheus
gauges read this snapshot instead, published every `snapshot_interval_s` and after admin changes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from lorafleet.worker.metrics import WorkerMetrics


@dataclass
class AdapterInfo:
    """One adapter as `/v1/adapters` and `/v1/models` show it."""

    name: str
    path: str | None
    state: str
    tier: str
    rank: int | None
    version: str | None
    running: int = 0
    waiting: int = 0
    request_rate: float = 0.0
    # Bytes the adapter costs this worker: its host-tier weights when resident, else its weight file on disk. The
    # operator packs adapters by these bytes against a worker's memory budget, so it needs the engine's own count.
    size_bytes: int | None = None


WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_size_bytes(av: Any) -> int | None:
    """Resident host weights' nbytes, else the on-disk weight file's size; None when neither can be read."""
    weights = getattr(av, "weights", None)
    if weights is not None:
        return int(weights.nbytes)
    for fname in WEIGHT_FILES:
        try:
            return os.stat(os.path.join(str(av.path), fname)).st_size
        except (OSError, TypeError):
            continue
    return None


@dataclass
class EngineSnapshot:
    """Engine state copied by the engine thread, so HTTP handlers can read it without touching the engine."""

    taken_at: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_usage: float = 0.0
    num_preemptions: int = 0
    adapters: list[AdapterInfo] = field(default_factory=list)
    running_by_adapter: dict[str, int] = field(default_factory=dict)
    waiting_by_adapter: dict[str, int] = field(default_factory=dict)


def _int(obj: Any, name: str, default: int = 0) -> int:
    value = getattr(obj, name, default)
    return int(value) if isinstance(value, int | float) else default


def _per_adapter(stats: Any, *names: str) -> dict[str, int]:
    for name in names:
        value = getattr(stats, name, None)
        if isinstance(value, dict):
            return {str(k): int(v) for k, v in value.items() if k is not None}
    return {}


def read_snapshot(engine: Any, metrics: WorkerMetrics | None) -> EngineSnapshot:
    """Copies the engine's stats and the adapter store's listing (engine thread only)."""
    stats = engine.stats()
    snap = EngineSnapshot(
        taken_at=time.time(),
        num_running=_int(stats, "num_running"),
        num_waiting=_int(stats, "num_waiting"),
        kv_blocks_total=_int(stats, "kv_blocks_total"),
        kv_blocks_used=_int(stats, "kv_blocks_used"),
        kv_usage=float(getattr(stats, "kv_usage", 0.0) or 0.0),
        num_preemptions=_int(stats, "num_preemptions"),
        running_by_adapter=_per_adapter(stats, "running_by_adapter", "running_per_adapter"),
        waiting_by_adapter=_per_adapter(stats, "waiting_by_adapter", "waiting_per_adapter"),
    )
    store = engine.store
    for name in store.names():
        av = store.current(name)
        snap.adapters.append(
            AdapterInfo(
                name=name,
                path=str(av.uri),
                state="loaded",
                tier=av.tier,
                rank=av.rank,
                version=str(av.version),
                running=snap.running_by_adapter.get(name, 0),
                waiting=snap.waiting_by_adapter.get(name, 0),
                request_rate=metrics.rates.rate(name) if metrics is not None else 0.0,
                size_bytes=adapter_size_bytes(av),
            )
        )
    return snap


def store_counters(engine: Any) -> dict[str, int]:
    counters = getattr(engine.store, "counters", {})
    return {k: int(v) for k, v in counters.items()}


def publish_snapshot(metrics: WorkerMetrics, snap: EngineSnapshot, engine: Any) -> None:
    running = [name for name, n in snap.running_by_adapter.items() if n > 0]
    waiting = [name for name, n in snap.waiting_by_adapter.items() if n > 0]
    metrics.update_engine(
        num_running=snap.num_running,
        num_waiting=snap.num_waiting,
        kv_usage=snap.kv_usage,
        kv_blocks_used=snap.kv_blocks_used,
        kv_blocks_total=snap.kv_blocks_total,
        num_preemptions=snap.num_preemptions,
        running_adapters=running,
        waiting_adapters=waiting,
    )
    tiers: dict[str, int] = {}
    for info in snap.adapters:
        tiers[info.tier] = tiers.get(info.tier, 0) + 1
    counters = store_counters(engine)
    metrics.update_store(
        tiers, counters, getattr(engine.store, "last_slot_load_seconds", None), [a.name for a in snap.adapters]
    )
