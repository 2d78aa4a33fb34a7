"""Whole training micro-batches as CUDA graphs, launched asynchronously between serving steps (co-serving).

Why: the serving loop leaves the GPU idle between and inside steps, and eager training pieces pay tens of ms of
*host* time each, which lands directly on TPOT. Here one micro-batch (forward, masked CE, LoRA-only backward,
gradient accumulation) is one CUDA graph, launched in microseconds right behind a serving step's kernels
(`after_launch`), before the host waits for that step's tokens. Nothing here waits on the GPU: losses and gradient
norms come back through pinned host buffers and events. One graph per shape bucket (`packing.py`), captured lazily
into one shared memory pool (graphs run one after another on one stream and keep no outputs). Attention is one SDPA
call per layer over `[prefix keys | new keys]`, masked by segment ids, so a sample sees only its own prefix (the
stashed prompt K/V, constants) and its own earlier tokens.

Placements (docs/coserving.md has the measurements): `serving` (default) is the serving stream itself, so a piece
never overlaps a serving kernel and one that outlasts the host's gap delays the next step by the overrun (the
controller sizes pieces to the gap); `partition` (experimental) is a lowest-priority stream on an SM partition
(worker/sm_partition.py) that leaves `serving_sms` SMs to serving, else the serving stream and the reason in the
status (`coServing.reason`). On CPU the same code runs eagerly, without streams or graphs, so the numerics are
tested against `LoRATrainer` there (fused AdamW skips a non-finite step on the device either way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lorafleet.worker.sm_partition import PartitionUnavailable, sm_partition
from lorafleet.worker.training.packing import Bucket, MicroBatch, pack
from lorafleet.worker.training.trainer import LoRATrainer, TrainSample

log = logging.getLogger(__name__)


PLACEMENTS = ("serving", "partition")


def check_placement(placement: str) -> str:
    """`placement`, or ValueError when it is none of PLACEMENTS (the API's check and the trainer's are this one)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    return placement


def training_stream(device: torch.device, placement: str, serving_sms: int) -> tuple[object | None, str, str]:
    """(the stream, None on CPU: pieces run inline; the placement in effect: serving | partition | cpu; why that is
    not the one asked for) for `placement`, built in the engine thread, whose current stream serves. An unknown
    placement is refused on every device, so a CPU test sees what a GPU job would."""
    check_placement(placement)
    if device.type != "cuda":
        return None, "cpu", ""
    if placement == "partition":
        total = torch.cuda.get_device_properties(device).multi_processor_count
        try:
            part = sm_partition(device, total - serving_sms)
            log.info("co-serving pieces on %d of %d SMs", part.sms, part.total_sms)
            return part.stream, "partition", ""
        except (PartitionUnavailable, ValueError) as exc:
            log.warning("no SM partition for training (%s): its pieces run on the serving stream", exc)
            return (
                torch.cuda.current_stream(device),
                "serving",
                f"no SM partition ({exc}): pieces run on the serving stream",
            )
    return torch.cuda.current_stream(device), "serving", ""


def on(stream):
    """A context that queues work on `stream` (inline without one)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class MaskedPackedAttention:
    """Packed samples against `[prefix | new]` keys; the mask comes from segment ids (static buffers)."""

    def __init__(self, st: _Static, scale: float, window: int | None, repeat_kv: bool) -> None:
        self.st = st
        self.scale = scale
        self.repeat_kv = repeat_kv
        idx = torch.arange(st.seg.shape[0], device=st.seg.device)
        m = (st.seg[:, None] == st.seg[None, :]) & (idx[None, :] <= idx[:, None])
        if window is not None:
            m &= st.pos[:, None] - st.pos[None, :] < window
        if st.pk is not None:
            mp = st.seg[:, None] == st.pseg[None, :]
            if window is not None:
                mp &= st.pos[:, None] - st.ppos[None, :] < window
            m = torch.cat([mp, m], dim=1)
        self.mask = m[None, None]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        st = self.st
        if st.pk is not None:
            k = torch.cat([st.pk[layer_idx].to(k.dtype), k], 0)
            v = torch.cat([st.pv[layer_idx].to(v.dtype), v], 0)
        q4, k4, v4 = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        rep = q.shape[1] // k.shape[1]
        if rep > 1 and self.repeat_kv:  # the mem-efficient kernel (masks + backward) wants equal head counts
            k4, v4 = k4.repeat_interleave(rep, dim=1), v4.repeat_interleave(rep, dim=1)
        gqa = rep > 1 and not self.repeat_kv
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=self.mask, scale=self.scale, enable_gqa=gqa)
        return out[0].transpose(0, 1)


# the tensors of a micro-batch that a graph reads (copied into its bucket's static buffers before each launch)
INPUTS = ("ids", "pos", "seg", "rows", "targets", "row_w", "pseg", "ppos")


@dataclass
class _Static(MicroBatch):
    """Device buffers of one bucket: a device copy of its first micro-batch (every launch overwrites its INPUTS),
    which the graph reads; it writes the row losses back."""

    row_loss: torch.Tensor | None = None
    pk: torch.Tensor | None = None
    pv: torch.Tensor | None = None
    graph: object | None = None


@dataclass
class Pending:
    """A launched piece: its host copy of the results lands when `event` completes."""

    kind: str  # "micro" | "step"
    event: object | None
    host: torch.Tensor
    batch: MicroBatch | None = None
    keep: list = field(default_factory=list)  # tensors the stream still reads (prefix K/V)
    tag: object = None

    def done(self) -> bool:
        return self.event is None or bool(self.event.query())


class GraphedTrainer:
    """Launches micro-batches and optimizer steps of a `LoRATrainer` without waiting for the GPU."""

    def __init__(
        self,
        trainer: LoRATrainer,
        max_tokens: int = 1024,
        max_prefix: int = 4096,
        use_graphs: bool | None = None,
        max_graphs: int = 12,
        stream: str = "serving",
        serving_sms: int = 16,
    ) -> None:
        self.t = trainer
        self.dev = trainer.device
        self.cuda = self.dev.type == "cuda"
        self.use_graphs = self.cuda if use_graphs is None else use_graphs and self.cuda
        self.max_tokens = max_tokens
        self.max_prefix = max_prefix
        self.max_graphs = max_graphs
        self.params = [p for p in trainer.lora.parameters()]
        self.acc = [torch.zeros_like(p) for p in self.params]
        # fallback: why stream_mode is not the placement asked for
        self.stream, self.stream_mode, self.fallback = training_stream(self.dev, stream, serving_sms)
        self.pool = torch.cuda.graph_pool_handle() if self.cuda else None
        self._static: dict[Bucket, _Static] = {}
        self._prefix_bufs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pending: deque[Pending] = deque()
        self._timings: deque = deque(maxlen=256)  # (start, end, units) of launched pieces, for predict_seconds
        self.seconds_per_unit: float | None = None  # measured GPU seconds per token unit (EMA)
        if not trainer.fused:
            raise ValueError("the graphed trainer needs the fused AdamW (device-side skip of non-finite steps)")

    # ---- the work ----
    def pack(self, samples: list[TrainSample], denom: int) -> list[MicroBatch]:
        return pack(samples, denom, self.max_tokens, self.max_prefix)

    def _buffers(self, mb: MicroBatch) -> _Static:
        b = mb.bucket
        st = self._static.get(b)
        if st is not None:
            return st
        d, shape = self.dev, self.t.model.shape
        pk = pv = None
        if b.prefix:
            # one K/V buffer pair per prefix size, shared by every bucket of that size (they run one after another
            # on one stream, each copying its prefixes in first): buckets multiply, these are the large buffers
            if b.prefix not in self._prefix_bufs:
                k = torch.zeros(
                    shape.num_layers, b.prefix, shape.num_kv_heads, shape.head_dim, dtype=self.t.dtype, device=d
                )
                self._prefix_bufs[b.prefix] = (k, torch.zeros_like(k))
            pk, pv = self._prefix_bufs[b.prefix]
        fields = {f.name: getattr(mb, f.name) for f in dataclasses.fields(MicroBatch)}
        # copies, never the batch's own tensors (`.to` aliases on CPU, and every launch overwrites the buffers);
        # no reference to the batch's K/V
        fields.update({n: fields[n].to(d, copy=True) for n in INPUTS}, prefix=[])
        st = _Static(**fields, row_loss=torch.zeros(b.rows, dtype=torch.float32, device=d), pk=pk, pv=pv)
        self._static[b] = st
        return st

    def _forward_backward(self, st: _Static) -> None:
        m = self.t.model
        attn = MaskedPackedAttention(st, m.attn_scale, m.shape.sliding_window, repeat_kv=self.cuda)
        h = m(st.ids, st.pos, attn, self.t.ctx)
        tok = F.cross_entropy(m.compute_logits(h.index_select(0, st.rows)), st.targets, reduction="none")
        grads = torch.autograd.grad((tok * st.row_w).sum(), self.params, allow_unused=True)
        pairs = [(a, g) for a, g in zip(self.acc, grads, strict=True) if g is not None]
        torch._foreach_add_([a for a, _ in pairs], [g for _, g in pairs])
        st.row_loss.copy_(tok.detach())

    def _capture(self, st: _Static) -> None:
        """Warm-up (lazy inits, cuBLAS workspaces) with zero row weights, then capture; both on the training
        stream. A zero-weight run adds exact zeros to the accumulators."""
        saved = st.row_w.clone()
        st.row_w.zero_()
        for _ in range(2):
            self._forward_backward(st)
        g = torch.cuda.CUDAGraph()
        # CUDA cannot capture on the legacy default stream (serving there: LORAFLEET_SERVING_STREAM=default): such a
        # graph is captured on torch's side stream and still replays on the training stream. A partition stream
        # captures itself: replays keep the SM restriction of the stream they were captured on.
        side = self.stream == torch.cuda.default_stream(self.dev)
        with torch.cuda.graph(g, pool=self.pool, stream=None if side else self.stream):
            self._forward_backward(st)
        st.row_w.copy_(saved)
        st.graph = g

    def launch(self, mb: MicroBatch, tag: object = None) -> Pending:
        """Copies the micro-batch into its bucket's buffers and launches it (forward + backward, one graph) on the
        training stream; its row losses come back through the returned Pending."""
        st = self._buffers(mb)
        nb = self.cuda
        keep: list = []
        if self.cuda:
            # prefix K/V from the stash were made on the serving stream
            self.stream.wait_stream(torch.cuda.current_stream(self.dev))
        with on(self.stream):
            for n in INPUTS:
                src = getattr(mb, n).pin_memory() if nb else getattr(mb, n)
                getattr(st, n).copy_(src, non_blocking=nb)
                keep.append(src)
            if st.pk is not None:
                at = 0
                for _k, kv in mb.prefix:
                    n = int(kv[0][0].shape[0])
                    for li, (k, v) in enumerate(kv):
                        st.pk[li, at : at + n].copy_(k, non_blocking=nb)
                        st.pv[li, at : at + n].copy_(v, non_blocking=nb)
                    at += n
                    keep.append(kv)
            start = self._record(timing=True) if self.cuda else time.perf_counter()
            self._whole(st)
            end = self._record(timing=True) if self.cuda else time.perf_counter()
            self._timings.append((start, end, mb.cost))
            host = torch.empty(mb.bucket.rows, dtype=torch.float32, pin_memory=self.cuda)
            host.copy_(st.row_loss, non_blocking=self.cuda)
            ev = self._record()
        p = Pending("micro", ev, host, batch=mb, keep=keep, tag=tag)
        self.pending.append(p)
        return p

    def _whole(self, st: _Static) -> None:
        if self.use_graphs and st.graph is None and sum(1 for x in self._static.values() if x.graph) < self.max_graphs:
            self._capture(st)
        if st.graph is not None:
            st.graph.replay()
        else:
            self._forward_backward(st)

    def launch_step(self, tag: object = None) -> Pending:
        """Clip, skip-if-non-finite and AdamW on the device, then zero the accumulators; the norm comes back later."""
        opt, max_norm = self.t.opt, self.t.cfg.max_grad_norm
        nb = self.cuda
        with on(self.stream):
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.acc)))
            if max_norm:
                torch._foreach_mul_(self.acc, (max_norm / (total + 1e-6)).clamp(max=1.0))
            for p, a in zip(self.params, self.acc, strict=True):
                p.grad = a
            opt.found_inf = (~torch.isfinite(total)).float()
            try:
                opt.step()
            finally:
                del opt.found_inf
                for p in self.params:
                    p.grad = None
            torch._foreach_zero_(self.acc)
            host = torch.empty(1, dtype=torch.float32, pin_memory=nb)
            host.copy_(total.reshape(1), non_blocking=nb)
            ev = self._record()
        self.t.step += 1
        p = Pending("step", ev, host, tag=tag)
        self.pending.append(p)
        return p

    def _record(self, timing: bool = False):
        if not self.cuda:
            return None
        ev = torch.cuda.Event(enable_timing=timing)
        ev.record(self.stream)
        return ev

    # ---- results ----
    def completed(self) -> list[Pending]:
        """Finished pieces in launch order (stops at the first one still running)."""
        out = []
        while self.pending and self.pending[0].done():
            out.append(self.pending.popleft())
        return out

    def predict_seconds(self, units: float) -> float:
        """Device seconds a piece of `units` should take, from the pieces measured so far (0 before any: calibrate).
        GPU pieces are timed by CUDA events once they are done; CPU pieces run inline and are timed by the host."""
        while self._timings and (not self.cuda or self._timings[0][1].query()):
            start, end, n = self._timings.popleft()
            seconds = start.elapsed_time(end) / 1000.0 if self.cuda else end - start
            spu = seconds / max(n, 1e-9)
            self.seconds_per_unit = spu if self.seconds_per_unit is None else 0.8 * self.seconds_per_unit + 0.2 * spu
        return 0.0 if self.seconds_per_unit is None else units * self.seconds_per_unit

    @property
    def inflight(self) -> int:
        """Micro-batches launched and not finished (on CPU they finish inline)."""
        return sum(1 for p in self.pending if p.kind == "micro" and not p.done())

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def reset(self) -> None:
        """Drops queued results and zeroes the accumulators (a stopped job / a rollback)."""
        self.synchronize()
        self.pending.clear()
        self._timings.clear()
        with torch.no_grad():
            torch._foreach_zero_(self.acc)
