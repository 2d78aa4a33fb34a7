"""Alchemist activation stash: the prompt state of served requests, kept in a budgeted host arena for training.

What is stashed: for every layer the prompt's rotated K and V, exactly as the serving prefill computed them with the
adapter version that served the request. Training on feedback then forwards only the completion against them
(`DenseAttentionContext(prefix_kv=...)`), as constants: that cuts only the gradient paths from the completion's loss
through the prompt positions' K/V; the completion tokens' own paths (their attention over the prompt included) are
exact. At an unchanged version the stashed K/V equal a recomputation up to float rounding, so the gradients equal
the "recompute the prompt under no-grad" ones (a test checks it).

Recording (`PrefillRecorder`): from the paged KV cache, after the prefill step's forward is queued. The forward
already wrote every prompt token's K/V there, so it needs no hook and stays a replayable CUDA graph; one gather per
layer for all recorded sequences, then side-stream copies ordered after the step, while the GPU computes it. Only
prompt tokens are recorded (a re-prefill after preemption that covers generated tokens is clipped).

Memory: one preallocated host arena (pinned on CUDA), filled in forward order as a ring: a new allocation
overwrites the oldest entries (counted as evicted), so recording never allocates, waits or grows past the cap. Entries
carry the job's optimizer step of their adapter version; one older than the staleness bound is recomputed or dropped
by the planner, which counts the choice.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

_ALIGN = 64


@dataclass
class _Alloc:
    offset: int
    nbytes: int
    owner: str
    dead: bool = False


@dataclass
class StashEntry:
    request_id: str
    adapter: str
    version: int
    version_step: int  # job optimizer step whose weights served this request
    num_layers: int
    prompt_ids: list[int] = field(default_factory=list)
    k: list[list[torch.Tensor]] = field(default_factory=list)  # per layer, chunks (arena views)
    v: list[list[torch.Tensor]] = field(default_factory=list)
    nbytes: int = 0
    complete: bool = False
    valid: bool = True
    event: object | None = None  # torch.cuda.Event recorded after the last copy
    allocs: list = field(default_factory=list)  # its arena ranges (marked dead when released)

    def tokens(self) -> int:
        return sum(t.shape[0] for t in self.k[0]) if self.k and self.k[0] else 0


@dataclass
class StashCounters:
    recorded: int = 0
    reused: int = 0
    recomputed: int = 0
    dropped: int = 0
    evicted: int = 0
    skipped: int = 0


class ActivationStash:
    """Ring-buffer host arena of prompt K/V per served request (see module docstring)."""

    def __init__(self, capacity_bytes: int, device: torch.device | str = "cpu", max_entries: int = 4096) -> None:
        self.capacity = int(capacity_bytes)
        self.device = torch.device(device)
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._arena = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=pin)
        # D2H copies run on a side stream after the layer's K/V exist, overlapping the rest of the forward
        self._stream = torch.cuda.Stream(device=self.device) if pin else None
        self._head = 0
        self._allocs: deque[_Alloc] = deque()
        self._entries: OrderedDict[str, StashEntry] = OrderedDict()
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self.counters = StashCounters()

    # ---- recording (serving side: must never block) ----
    def begin(self, request_id: str, adapter: str, version: int, version_step: int, num_layers: int) -> None:
        with self._lock:
            old = self._entries.pop(request_id, None)
            if old is not None:
                old.valid = False
            e = StashEntry(request_id, adapter, version, version_step, num_layers)
            e.k = [[] for _ in range(num_layers)]
            e.v = [[] for _ in range(num_layers)]
            self._entries[request_id] = e
            while len(self._entries) > self._max_entries:
                _, victim = self._entries.popitem(last=False)
                self._invalidate(victim)

    def add(self, request_id: str, layer: int, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Copies one prefill chunk of one layer's K/V ([n, Hk, D]) into the arena; False if not recording."""
        with self._lock:
            e = self._entries.get(request_id)
            if e is None or not e.valid or e.complete:
                return False
            views = []
            for t in (k, v):
                dst = self._alloc(t, request_id)
                if dst is None:
                    return self._skip(e)
                e.allocs.append(self._allocs[-1])
                views.append(dst)
            if self._stream is not None and k.is_cuda:
                self._stream.wait_stream(torch.cuda.current_stream(k.device))
                with torch.cuda.stream(self._stream):
                    for dst, t in zip(views, (k, v), strict=True):
                        dst.copy_(t.detach(), non_blocking=True)
                        t.record_stream(self._stream)  # keep the source alive until the copy ran
            else:
                for dst, t in zip(views, (k, v), strict=True):
                    dst.copy_(t.detach())
            e.k[layer].append(views[0])
            e.v[layer].append(views[1])
            e.nbytes += k.numel() * k.element_size() + v.numel() * v.element_size()
            return True

    def finish(self, request_id: str, prompt_ids: list[int]) -> bool:
        """Marks the prompt fully recorded (call after its last prefill chunk)."""
        with self._lock:
            e = self._entries.get(request_id)
            if e is None or not e.valid:
                return False
            if any(len(x) == 0 for x in e.k) or sum(t.shape[0] for t in e.k[0]) != len(prompt_ids):
                return self._skip(e)
            e.prompt_ids = list(prompt_ids)
            e.complete = True
            if self._stream is not None:
                ev = torch.cuda.Event()
                ev.record(self._stream)
                e.event = ev
            self.counters.recorded += 1
            return True

    def abort(self, request_id: str) -> None:
        with self._lock:
            e = self._entries.pop(request_id, None)
            if e is not None:
                self._invalidate(e)

    # ---- training side ----
    def take(self, request_id: str) -> StashEntry | None:
        """Removes and returns a complete entry; its tensors stay valid until the next recording overwrites them,
        so the caller must `load` it right away (the trainer runs between serving iterations, never concurrently)."""
        with self._lock:
            e = self._entries.get(request_id)
            if e is None or not e.valid or not e.complete:
                return None
            del self._entries[request_id]
            return e

    def load(
        self, e: StashEntry, device: torch.device | str, dtype: torch.dtype | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Brings an entry's per-layer K/V to `device` (in backward order, top layer first, as Alchemist frees and
        reloads; the list is returned in layer order) and releases its arena space."""
        if e.event is not None:
            e.event.synchronize()
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * e.num_layers
        dev = torch.device(device)
        for layer in reversed(range(e.num_layers)):
            pair = []
            for chunks in (e.k[layer], e.v[layer]):
                n = sum(c.shape[0] for c in chunks)
                dst = torch.empty((n, *chunks[0].shape[1:]), dtype=chunks[0].dtype, device=dev)
                off = 0
                for c in chunks:  # straight from the (pinned) arena: async DMA, no host-side concatenation
                    dst[off : off + c.shape[0]].copy_(c, non_blocking=True)
                    off += c.shape[0]
                pair.append(dst.to(dtype) if dtype is not None else dst)
            out[layer] = (pair[0], pair[1])
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()  # the arena range may be reused after we return
        with self._lock:
            self._release(e)
        return out  # type: ignore[return-value]

    def has(self, request_id: str) -> bool:
        with self._lock:
            e = self._entries.get(request_id)
            return e is not None and e.valid and e.complete

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._allocs if not a.dead)

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for e in self._entries.values() if e.valid and e.complete)

    # ---- arena ----
    def _alloc(self, like: torch.Tensor, owner: str) -> torch.Tensor | None:
        """Ring allocation in O(1) amortised: live allocations sit in the deque in address order from the tail, so
        the ones a new range overwrites are always at its front (after a wrap, the rest of the previous lap is
        dropped first)."""
        n = like.numel() * like.element_size()
        n_al = (n + _ALIGN - 1) // _ALIGN * _ALIGN
        if n_al > self.capacity:
            return None
        if self._head + n_al > self.capacity:
            while self._allocs and self._allocs[0].offset >= self._head:  # the previous lap's tail end
                if not self._evict_front(owner):
                    return None
            self._head = 0
        lo, hi = self._head, self._head + n_al
        while self._allocs and self._allocs[0].offset < hi and self._allocs[0].offset >= lo:
            if not self._evict_front(owner):
                return None
        self._allocs.append(_Alloc(lo, n_al, owner))
        self._head = hi
        return self._arena[lo : lo + n].view(like.dtype).view(like.shape)

    def _evict_front(self, owner: str) -> bool:
        a = self._allocs[0]
        if a.owner == owner and not a.dead:
            return False  # this request alone would wrap onto itself
        self._allocs.popleft()
        if a.dead:
            return True
        victim = self._entries.get(a.owner)
        if victim is not None and victim.valid:
            self._entries.pop(a.owner, None)
            self._invalidate(victim)
            if victim.complete:
                self.counters.evicted += 1
            else:
                self.counters.skipped += 1
        return True

    def _skip(self, e: StashEntry) -> bool:
        """Drops a recording that cannot complete (no room, or not the whole prompt); False, for the caller."""
        self._invalidate(e)
        self._entries.pop(e.request_id, None)
        self.counters.skipped += 1
        return False

    def _invalidate(self, e: StashEntry) -> None:
        e.valid = False
        self._release(e)

    def _release(self, e: StashEntry) -> None:
        for a in e.allocs:
            a.dead = True
        e.allocs = []


# adapter name -> (stash, version -> optimizer step of that version) or None when not recording
Lookup = Callable[[str], tuple[ActivationStash, Callable[[str | None], int]] | None]
# called with the runner's per-layer (k_cache, v_cache) and the step's slot mapping, after the forward is queued
Record = Callable[[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor], None]


class PrefillRecorder:
    def __init__(self, lookup: Lookup, num_layers: int) -> None:
        self.lookup = lookup
        self.num_layers = num_layers

    def __call__(self, batch, inp) -> Record | None:
        spans = []
        row = 0
        for i in inp.order:
            seq, n = batch.seqs[i], batch.num_tokens[i]
            start = seq.num_computed_tokens
            ad = seq.adapter
            if ad is not None and start < seq.num_prompt_tokens:
                hit = self.lookup(ad.name)
                if hit is not None:
                    stash, version_step = hit
                    take = min(n, seq.num_prompt_tokens - start)
                    if start == 0:
                        stash.begin(seq.request_id, ad.name, 0, version_step(ad.version), self.num_layers)
                    done = start + take == seq.num_prompt_tokens
                    spans.append((stash, seq, row, row + take, done))
            row += n
        if not spans:
            return None

        def record(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], slot_mapping: torch.Tensor) -> None:
            try:
                _record(kv_caches, slot_mapping)
            except Exception:  # noqa: BLE001 - recording must never fail a serving step
                log.exception("activation recording failed; dropping this step's recordings")
                for stash, seq, *_ in spans:
                    stash.abort(seq.request_id)

        def _record(kv_caches, slot_mapping) -> None:
            rows = torch.cat([slot_mapping[lo:hi] for _, _, lo, hi, _ in spans])
            offsets = [0]
            for _, _, lo, hi, _ in spans:
                offsets.append(offsets[-1] + hi - lo)
            last = self.num_layers - 1
            for layer, (kc, vc) in enumerate(kv_caches):
                k = kc.flatten(0, 1).index_select(0, rows)  # [n, Hk, D]: this step's prompt tokens, all spans
                v = vc.flatten(0, 1).index_select(0, rows)
                for j, (stash, seq, _lo, _hi, done) in enumerate(spans):
                    a, b = offsets[j], offsets[j + 1]
                    ok = stash.add(seq.request_id, layer, k[a:b], v[a:b])
                    if ok and done and layer == last:
                        stash.finish(seq.request_id, seq.token_ids[: seq.num_prompt_tokens])

        return record
