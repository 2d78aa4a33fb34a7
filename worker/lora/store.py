"""Adapter store in tiers: registered (path/URI) → host memory (pinned on CUDA) → GPU slots (stacked, padded).

Why tiers (S-LoRA, vLLM `max_loras`/`max_cpu_loras`): thousands of adapters can be registered, dozens kept in host
memory, and only `max_loras` live in the stacked slot tensors the batched-LoRA ops read. Slots are LRU-evicted, but
never while a running sequence uses them. Every request pins an adapter *version*: reloading a name with new
weights creates a new version in a new slot, and in-flight requests finish on the version they started with.
On CUDA, slot uploads run on a side stream (after the compute already queued) and the model runner waits on the
upload's event, so a cold adapter overlaps with the previous step instead of stalling it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from lorafleet.worker.lora.adapter import AdapterError, LoRAWeights, UnknownAdapterError, read_adapter
from lorafleet.worker.models.llama import ModelShape
from lorafleet.worker.paths import PathEscape, entries_within

log = logging.getLogger(__name__)
Resolver = Callable[[str], Path]
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
_tick = itertools.count(1)


@dataclass(eq=False)
class AdapterVersion:
    name: str
    version: str
    path: Path
    uri: str
    rank: int
    scale: float
    digest: str
    weights: LoRAWeights | None = None  # host tier; None when evicted from host memory
    refs: int = 0  # in-flight requests (waiting or running) holding this version
    running: int = 0  # running sequences pinning its GPU slot
    slot: int | None = None
    ready: object | None = None  # torch.cuda.Event of the slot upload
    retired: bool = False  # no longer the current version of its name
    targets: set[str] = field(default_factory=set)  # projections it adapts (slot bookkeeping)
    last_used: int = 0
    registered_at: float = field(default_factory=time.time)

    @property
    def tier(self) -> str:
        return "gpu" if self.slot is not None else ("host" if self.weights is not None else "disk")


class AdapterStore:
    def __init__(
        self,
        shape: ModelShape,
        device: torch.device,
        dtype: torch.dtype,
        max_slots: int = 8,
        max_cpu: int = 64,
        max_rank: int = 64,
        roots: list[str] | None = None,
        resolvers: dict[str, Resolver] | None = None,
    ) -> None:
        self.shape = shape
        self.device = device
        self.dtype = dtype
        self.max_slots = max_slots
        self.max_cpu = max_cpu
        self.max_rank = max_rank
        self.roots = [Path(r).resolve() for r in roots or []]
        self.resolvers = dict(resolvers or {})
        self._current: dict[str, AdapterVersion] = {}
        self._host: list[AdapterVersion] = []  # versions holding host weights
        self._slots: list[AdapterVersion | None] = [None] * max_slots
        # Per layer, projections that share an input are stacked in one tensor (GROUPS): A [S, n*R, in] and
        # B [S, sum(out), R], so a fused base projection (qkv, gate|up) needs one shrink and one expand; each
        # projection's [S, R, in] / [S, out, R] tensor is a view into its group's tensors.
        self._a: dict[tuple[int, str], torch.Tensor] = {}
        self._b: dict[tuple[int, str], torch.Tensor] = {}
        self._groups: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = {}
        for layer in range(shape.num_layers):
            for group, projs in GROUPS.items():
                fin = shape.proj_dims(projs[0])[0]
                outs = [shape.proj_dims(p)[1] for p in projs]
                a = torch.zeros(max_slots, len(projs) * max_rank, fin, dtype=dtype, device=device)
                b = torch.zeros(max_slots, sum(outs), max_rank, dtype=dtype, device=device)
                bounds = tuple(sum(outs[:i]) for i in range(len(outs) + 1))
                self._groups[(layer, group)] = (a, b, bounds)
                for i, proj in enumerate(projs):
                    self._a[(layer, proj)] = a[:, i * max_rank : (i + 1) * max_rank]
                    self._b[(layer, proj)] = b[:, bounds[i] : bounds[i + 1]]
        self.scales = torch.zeros(max_slots, dtype=torch.float32, device=device)
        self._proj_users: Counter[str] = Counter()
        self._cuda = device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(device=device) if self._cuda else None
        self.counters: Counter[str] = Counter()  # loads, slot_loads, slot_evictions, host_evictions, refusals
        self.last_slot_load_seconds = 0.0

    # ---- registry tier -------------------------------------------------------------------------------------------
    def allow_root(self, root: str | Path) -> None:
        """Lets adapters load from `root` too (resolved once, here): the training service's own versions directory on
        a worker without a shared adapter root."""
        real = Path(root).resolve()
        if real not in self.roots:
            self.roots.append(real)

    def resolve_uri(self, uri: str) -> Path:
        """Maps an adapter location to a local directory, enforcing the allowed roots and schemes."""
        parsed = urlparse(uri)
        scheme = parsed.scheme if len(parsed.scheme) > 1 else ""  # "C:" style drive letters are not schemes
        if scheme in self.resolvers:
            return self.resolvers[scheme](uri)
        if scheme in ("s3", "hf", "gs", "http", "https"):
            raise AdapterError(f"{uri}: scheme {scheme}:// is recognised but no resolver is configured on this worker")
        if scheme == "file":
            path = Path(parsed.path)
        elif scheme:
            raise AdapterError(f"{uri}: unsupported scheme {scheme}://")
        else:
            path = Path(uri)
        if not self.roots:
            raise AdapterError(
                f"{uri}: no adapter roots are configured (EngineConfig.adapter_roots); refusing local paths"
            )
        real = path.resolve()
        if not any(real.is_relative_to(r) for r in self.roots):
            raise AdapterError(f"{uri}: path is outside the allowed adapter roots {[str(r) for r in self.roots]}")
        if real.is_dir():
            try:
                entries_within(self.roots, real)  # a file symlink inside the adapter leading out of the roots
            except PathEscape as exc:
                raise AdapterError(f"{uri}: {exc}") from exc
        return real

    def register(self, name: str, uri: str, version: str | None = None) -> AdapterVersion:
        """Validates and loads an adapter into host memory and makes it the current version of `name`."""
        if not name or name.strip() != name:
            raise AdapterError(f"invalid adapter name {name!r}")
        try:
            path = self.resolve_uri(str(uri))
            weights = read_adapter(path, self.shape, self.max_rank, self.dtype)
        except AdapterError:
            self.counters["refusals"] += 1
            raise
        ver = version or weights.digest
        cur = self._current.get(name)
        if cur is not None and cur.version == ver:
            return cur
        if self._cuda:
            weights.weights = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in weights.weights.items()}
        av = AdapterVersion(name, ver, path, str(uri), weights.rank, weights.scale, weights.digest, weights)
        av.targets = weights.targets
        self._current[name] = av
        self._host.append(av)
        self.counters["loads"] += 1
        if cur is not None:
            self._retire(cur)
        self._trim_host(keep=av)
        log.info("adapter %s version %s registered (rank %d, %s)", name, ver, av.rank, path)
        return av

    def unregister(self, name: str) -> None:
        """New requests for `name` fail at once; requests already holding a version finish on it."""
        av = self._current.pop(name, None)
        if av is None:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        self._retire(av)

    def current(self, name: str) -> AdapterVersion:
        av = self._current.get(name)
        if av is None:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        return av

    def names(self) -> list[str]:
        return sorted(self._current)

    def versions(self) -> list[AdapterVersion]:
        """Current versions plus retired ones still held by in-flight requests."""
        seen = {id(v): v for v in self._current.values()}
        for v in [*self._host, *(s for s in self._slots if s is not None)]:
            seen.setdefault(id(v), v)
        return list(seen.values())

    # ---- request references --------------------------------------------------------------------------------------
    def acquire(self, name: str) -> AdapterVersion:
        av = self.current(name)
        av.refs += 1
        av.last_used = next(_tick)
        return av

    def release(self, av: AdapterVersion) -> None:
        av.refs -= 1
        if av.retired and av.refs <= 0:
            self._drop(av)

    def _retire(self, av: AdapterVersion) -> None:
        av.retired = True
        if av.refs <= 0:
            self._drop(av)

    def _drop(self, av: AdapterVersion) -> None:
        if av.slot is not None and av.running == 0:
            self._free_slot(av)
        if av in self._host:
            self._host.remove(av)
        av.weights = None

    # ---- host tier -----------------------------------------------------------------------------------------------
    def _trim_host(self, keep: AdapterVersion | None = None) -> None:
        while len(self._host) > self.max_cpu:
            victims = [v for v in self._host if v.refs == 0 and v.slot is None and v is not keep]
            if not victims:
                return
            v = min(victims, key=lambda x: x.last_used)
            self._host.remove(v)
            v.weights = None
            self.counters["host_evictions"] += 1

    def _host_weights(self, av: AdapterVersion) -> LoRAWeights:
        if av.weights is None:
            w = read_adapter(av.path, self.shape, self.max_rank, self.dtype)
            if w.digest != av.digest:
                raise AdapterError(f"adapter {av.name} changed on disk since version {av.version} was registered")
            if self._cuda:
                w.weights = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in w.weights.items()}
            av.weights = w
            self._host.append(av)
            self._trim_host(keep=av)
        return av.weights

    # ---- GPU slot tier -------------------------------------------------------------------------------------------
    def stacked(self, layer_idx: int, proj: str, always: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The slot tensors of one projection; None when no resident adapter targets it (skip the LoRA work)."""
        if self._proj_users[proj] == 0 and not always:
            return None
        return self._a[(layer_idx, proj)], self._b[(layer_idx, proj)]

    def stacked_group(
        self, layer_idx: int, group: str, always: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]] | None:
        """(A [S, n*R, in], B [S, sum(out), R], output column bounds) of a projection group, or None if unused."""
        if not always and not any(self._proj_users[p] for p in GROUPS[group]):
            return None
        return self._groups[(layer_idx, group)]

    def free_slots(self) -> int:
        return sum(1 for s in self._slots if s is None or s.running == 0)

    def ensure_slot(
        self, av: AdapterVersion, keep: Collection[AdapterVersion] = (), strict: bool = False
    ) -> int | None:
        """Puts the version in a GPU slot (LRU-evicting an unused one); None if every slot is pinned.

        `keep` are resident versions that waiting requests want: they are evicted only when no other unpinned slot
        is left, and never with `strict` (prefetching must not evict what the next admissions will use)."""
        av.last_used = next(_tick)
        if av.slot is not None:
            return av.slot
        slot = self._vacant_slot(keep, strict)
        if slot is not None:
            self._upload(av, slot)
        return slot

    def _vacant_slot(self, keep: Collection[AdapterVersion] = (), strict: bool = False) -> int | None:
        """A free slot, else the least recently used unpinned one, evicted (see `ensure_slot`); None if all pinned."""
        free = [i for i, s in enumerate(self._slots) if s is None]
        if free:
            return free[0]
        victims = [s for s in self._slots if s is not None and s.running == 0]
        if strict:
            victims = [s for s in victims if s not in keep]
        if not victims:
            return None
        victim = min(victims, key=lambda x: (x in keep, x.last_used))
        slot = victim.slot
        self._free_slot(victim)
        self.counters["slot_evictions"] += 1
        return slot

    def pin(self, av: AdapterVersion) -> int:
        slot = self.ensure_slot(av)
        if slot is None:
            raise RuntimeError("pin() without a free slot; call ensure_slot first")
        av.running += 1
        return slot

    def unpin(self, av: AdapterVersion) -> None:
        av.running -= 1
        if av.running == 0 and av.retired and av.refs <= 0 and av.slot is not None:
            self._free_slot(av)

    def prefetch(self, av: AdapterVersion, keep: Collection[AdapterVersion] = ()) -> bool:
        """Starts the upload of a soon-needed adapter if a slot is free or evictable outside `keep` (never
        blocks on CUDA: the upload runs on the copy stream)."""
        return self.ensure_slot(av, keep, strict=True) is not None

    def wait_ready(self, slots: list[int]) -> None:
        """Makes the compute stream wait for the uploads of these slots (no-op on CPU)."""
        if not self._cuda:
            return
        stream = torch.cuda.current_stream(self.device)
        for s in slots:
            av = self._slots[s] if 0 <= s < self.max_slots else None
            if av is not None and av.ready is not None:
                stream.wait_event(av.ready)
                av.ready = None

    def _free_slot(self, av: AdapterVersion) -> None:
        slot = av.slot
        assert slot is not None
        self._slots[slot] = None
        av.slot = None
        av.ready = None
        self.scales[slot] = 0.0
        for proj in av.targets:
            self._proj_users[proj] -= 1

    def _occupy(self, av: AdapterVersion, slot: int) -> None:
        """The bookkeeping of a filled slot, which `_free_slot` undoes."""
        self._slots[slot] = av
        av.slot = slot
        for proj in av.targets:
            self._proj_users[proj] += 1

    def _upload(self, av: AdapterVersion, slot: int) -> None:
        t0 = time.perf_counter()
        w = self._host_weights(av)
        r = w.rank
        stream = self._copy_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))  # the slot's old contents may still be read
        ctx = torch.cuda.stream(stream) if stream is not None else _nullctx()
        with ctx, torch.no_grad():
            for key, a_stack in self._a.items():
                b_stack = self._b[key]
                pair = w.weights.get(key)
                if pair is None:
                    a_stack[slot].zero_()
                    b_stack[slot].zero_()
                    continue
                a, b = pair
                a_stack[slot, :r].copy_(a, non_blocking=True)
                a_stack[slot, r:].zero_()
                b_stack[slot, :, :r].copy_(b, non_blocking=True)
                b_stack[slot, :, r:].zero_()
            self.scales[slot] = w.scale
        if stream is not None:
            ev = torch.cuda.Event()
            ev.record(stream)
            av.ready = ev
        self._occupy(av, slot)
        self.counters["slot_loads"] += 1
        self.last_slot_load_seconds = time.perf_counter() - t0

    def stats(self) -> dict[str, int]:
        tiers = Counter(v.tier for v in self.versions())
        return {
            "registered": len(self._current),
            "gpu": tiers["gpu"],
            "host": tiers["host"],
            "disk": tiers["disk"],
            "slots_total": self.max_slots,
            "slots_pinned": sum(1 for s in self._slots if s is not None and s.running > 0),
            **self.counters,
        }


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
