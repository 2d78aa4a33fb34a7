"""Whole training micro-batches as CUDA graphs, launched asynchronously between serving steps (co-serving).

Why: the serving loop leaves the GPU idle between and inside steps, and the eager layer-wise pieces
(`pipeline.py`) pay tens of ms of *host* time each, which lands directly on TPOT. Here one micro-batch (forward,
masked CE, LoRA-only backward, gradient accumulation) is one CUDA graph: launching it costs microseconds of host
time. The engine plugin queues it right behind a serving step's kernels (`after_launch`), before the host waits for
that step's tokens. Where it runs is the job's placement (PLACEMENTS): on the serving stream itself by default, so
it never overlaps a serving kernel, or, experimentally, on a lowest-priority stream confined to an SM partition.
Nothing here waits on the GPU: losses and gradient norms come back through pinned host buffers and events, and the
job reads them once they are done.

Shapes: a micro-batch packs whole samples (tokens T, loss rows R, stashed prefix keys P) and is padded to a bucket
(multiples of 128 / 128 / 512), one graph per bucket, captured lazily into one shared memory pool (graphs run one
after another on one stream and keep no outputs, so sharing is safe). Padding rows have segment -1 and weight 0.
Attention is one SDPA call per layer over `[prefix keys | new keys]` with a boolean mask built from segment ids, so
a sample sees only its own prefix (Alchemist: the stashed prompt K/V, constants) and its own earlier tokens.

On CPU (tests) the same code runs eagerly, without streams or graphs, so the numerics are tested against
`LoRATrainer` there; the optimizer step is the same device-side path (fused AdamW skips a non-finite step itself).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lorafleet.worker.sm_partition import PartitionUnavailable, sm_partition
from lorafleet.worker.training.trainer import LoRATrainer, TrainSample

log = logging.getLogger(__name__)

# Where pieces run on a GPU (docs/coserving.md has the measurements that chose them):
# - serving: queued on the serving stream between serving steps, so a piece never overlaps a serving kernel; a
#   piece that outlasts the host's gap delays the next step by the overrun (the controller sizes pieces to the gap)
# - partition (experimental): a lowest-priority stream on an SM partition (green context) that leaves
#   `serving_sms` SMs to serving; where the driver cannot make one, pieces run on the serving stream
PLACEMENTS = ("serving", "partition")
TOKEN_ALIGN = 128
PREFIX_ALIGN = 512


def _round_up(n: int, k: int) -> int:
    return max(k, -(-n // k) * k)


@dataclass(frozen=True)
class Bucket:
    tokens: int
    rows: int
    prefix: int


@dataclass
class MicroBatch:
    """One packed micro-batch, built on the host (padded to its bucket); `owners[i]` = sample index of loss row i."""

    bucket: Bucket
    samples: list[int]  # indices into the group's samples
    ids: torch.Tensor
    pos: torch.Tensor
    seg: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    row_w: torch.Tensor
    owners: list[int]
    prefix: list[tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]]  # (segment, per-layer (k, v)) in order
    pseg: torch.Tensor
    ppos: torch.Tensor
    tokens: int  # real (unpadded) tokens

    @property
    def cost(self) -> float:
        """Token units (1 = one token's forward): forward + a backward of about the same size."""
        return 2.0 * self.tokens


def sample_tokens(s: TrainSample) -> int:
    """Tokens a sample forwards: the completion against a stashed prefix, else prompt + completion - 1."""
    return len(s.completion_ids) if s.prefix_kv is not None else len(s.prompt_ids) + len(s.completion_ids) - 1


def pack(samples: list[TrainSample], denom: int, max_tokens: int, max_prefix: int) -> list[MicroBatch]:
    """Greedy packing of whole samples in order; raises ValueError for a sample that fits no micro-batch."""
    out: list[MicroBatch] = []
    cur: list[int] = []
    t = p = 0
    for i, s in enumerate(samples):
        n = sample_tokens(s)
        pl = 0 if s.prefix_kv is None else int(s.prefix_kv[0][0].shape[0])
        if n > max_tokens or pl > max_prefix:
            raise ValueError(f"sample of {n} tokens / {pl} prefix keys exceeds the graphed micro-batch")
        if cur and (t + n > max_tokens or p + pl > max_prefix):
            out.append(_build(samples, cur, denom))
            cur, t, p = [], 0, 0
        cur.append(i)
        t += n
        p += pl
    if cur:
        out.append(_build(samples, cur, denom))
    return out


def _build(samples: list[TrainSample], idx: list[int], denom: int) -> MicroBatch:
    ids: list[int] = []
    pos: list[int] = []
    seg: list[int] = []
    rows: list[int] = []
    targets: list[int] = []
    row_w: list[float] = []
    owners: list[int] = []
    prefix = []
    pseg: list[int] = []
    ppos: list[int] = []
    for k, i in enumerate(idx):
        s = samples[i]
        p, c = s.prompt_ids, s.completion_ids
        if not p or not c:
            raise ValueError("a training sample needs a non-empty prompt and completion")
        base = len(ids)
        if s.prefix_kv is not None and s.prefix_kv[0][0].shape[0] > 0:
            pl = int(s.prefix_kv[0][0].shape[0])
            prefix.append((k, s.prefix_kv))
            pseg += [k] * pl
            ppos += list(range(pl))
            x, start, first_loss = [p[-1], *c[:-1]], len(p) - 1, 0
        elif s.prefix_kv is not None:  # an empty prefix (one-token prompt)
            x, start, first_loss = [p[-1], *c[:-1]], len(p) - 1, 0
        else:
            x, start, first_loss = [*p, *c[:-1]], 0, len(p) - 1
        ids += x
        pos += range(start, start + len(x))
        seg += [k] * len(x)
        for j, tgt in enumerate(c):
            rows.append(base + first_loss + j)
            targets.append(tgt)
            row_w.append(s.weight / denom)
            owners.append(i)
    n, r, pl = len(ids), len(rows), len(pseg)
    b = Bucket(_round_up(n, TOKEN_ALIGN), _round_up(r, TOKEN_ALIGN), 0 if pl == 0 else _round_up(pl, PREFIX_ALIGN))
    pad_t, pad_r, pad_p = b.tokens - n, b.rows - r, b.prefix - pl
    return MicroBatch(
        bucket=b,
        samples=list(idx),
        ids=torch.tensor(ids + [0] * pad_t),
        pos=torch.tensor(pos + [0] * pad_t),
        seg=torch.tensor(seg + [-1] * pad_t),
        rows=torch.tensor(rows + [0] * pad_r),
        targets=torch.tensor(targets + [-100] * pad_r),
        row_w=torch.tensor(row_w + [0.0] * pad_r, dtype=torch.float32),
        owners=owners,
        prefix=prefix,
        pseg=torch.tensor(pseg + [-2] * pad_p),
        ppos=torch.tensor(ppos + [0] * pad_p),
        tokens=n,
    )


class MaskedPackedAttention:
    """Packed samples against `[prefix | new]` keys; the mask comes from segment ids (static buffers)."""

    def __init__(self, st: _Static, scale: float, window: int | None, repeat_kv: bool) -> None:
        self.st = st
        self.scale = scale
        self.repeat_kv = repeat_kv
        t = st.seg.shape[0]
        idx = torch.arange(t, device=st.seg.device)
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
            out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=self.mask, scale=self.scale)
        elif rep > 1:
            out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=self.mask, scale=self.scale, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=self.mask, scale=self.scale)
        return out[0].transpose(0, 1)


@dataclass
class _Static:
    """Device buffers of one bucket: the graph reads its inputs from here and writes row losses back."""

    ids: torch.Tensor
    pos: torch.Tensor
    seg: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    row_w: torch.Tensor
    row_loss: torch.Tensor
    pk: torch.Tensor | None
    pv: torch.Tensor | None
    pseg: torch.Tensor
    ppos: torch.Tensor
    graph: object | None = None
    runs: int = 0


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
        self.stream = None
        self.pool = None
        self.stream_mode = stream if self.cuda else "cpu"
        self.fallback = ""  # why stream_mode is not the placement asked for (a partition the driver cannot make)
        if stream not in PLACEMENTS:
            raise ValueError(f"stream must be one of {PLACEMENTS}, got {stream!r}")
        if self.cuda:
            self.stream = self._make_stream(stream, serving_sms)
            self.pool = torch.cuda.graph_pool_handle()
        self._static: dict[Bucket, _Static] = {}
        self._prefix_bufs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pending: deque[Pending] = deque()
        self.graph_replays = 0
        self.eager_runs = 0
        self._active: _Active | None = None
        self._piece_events: deque = deque()
        self._timings: deque = deque()  # (start event, end event, units) of launched pieces, for predict_seconds
        self.seconds_per_unit: float | None = None  # measured GPU seconds per token unit (EMA)
        if not trainer.fused:
            raise ValueError("the graphed trainer needs the fused AdamW (device-side skip of non-finite steps)")

    def _make_stream(self, mode: str, serving_sms: int):
        """Where pieces run (see PLACEMENTS). Built in the engine thread, whose current stream serves."""
        if mode == "partition":
            total = torch.cuda.get_device_properties(self.dev).multi_processor_count
            try:
                part = sm_partition(self.dev, total - serving_sms)
                log.info("co-serving pieces on %d of %d SMs", part.sms, part.total_sms)
                return part.stream
            except (PartitionUnavailable, ValueError) as exc:
                log.warning("no SM partition for training (%s): its pieces run on the serving stream", exc)
                self.stream_mode = "serving"
                self.fallback = f"no SM partition ({exc}): pieces run on the serving stream"
        return torch.cuda.current_stream(self.dev)

    # ---- the work ----
    def pack(self, samples: list[TrainSample], denom: int) -> list[MicroBatch]:
        return pack(samples, denom, self.max_tokens, self.max_prefix)

    def _ctx(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else _Null()

    def _buffers(self, b: Bucket) -> _Static:
        st = self._static.get(b)
        if st is not None:
            return st
        d, shape = self.dev, self.t.model.shape
        long = dict(dtype=torch.long, device=d)
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
        st = _Static(
            ids=torch.zeros(b.tokens, **long),
            pos=torch.zeros(b.tokens, **long),
            seg=torch.full((b.tokens,), -1, **long),
            rows=torch.zeros(b.rows, **long),
            targets=torch.full((b.rows,), -100, **long),
            row_w=torch.zeros(b.rows, dtype=torch.float32, device=d),
            row_loss=torch.zeros(b.rows, dtype=torch.float32, device=d),
            pk=pk,
            pv=pv,
            pseg=torch.full((b.prefix,), -2, **long),
            ppos=torch.zeros(b.prefix, **long),
        )
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
        with torch.cuda.graph(g, pool=self.pool, stream=self._capture_stream()):
            self._forward_backward(st)
        st.row_w.copy_(saved)
        st.graph = g

    def _capture_stream(self):
        """Where graphs are captured. CUDA cannot capture on the legacy default stream (serving there:
        LORAFLEET_SERVING_STREAM=default): such a graph is captured on a side stream (None: torch's) and still
        replays on the training stream. A partition stream must capture itself: replays keep the SM restriction of
        the stream they were captured on."""
        return None if self.stream == torch.cuda.default_stream(self.dev) else self.stream

    def launch(self, mb: MicroBatch, tag: object = None) -> Pending:
        """The whole micro-batch at once (all its pieces)."""
        self.begin(mb, tag)
        while True:
            p = self.launch_piece()
            if p is not None:
                return p

    @property
    def active(self) -> bool:
        return self._active is not None

    def begin(self, mb: MicroBatch, tag: object = None) -> None:
        """Copies the micro-batch into its bucket's buffers on the training stream; it launches as one (forward +
        backward) graph."""
        if self._active is not None:
            raise RuntimeError("a micro-batch is still being launched")
        st = self._buffers(mb.bucket)
        nb = self.cuda
        keep: list = []
        if self.cuda:
            # prefix K/V from the stash were made on the serving stream
            self.stream.wait_stream(torch.cuda.current_stream(self.dev))
        with self._ctx():
            for dst, src in (
                (st.ids, mb.ids),
                (st.pos, mb.pos),
                (st.seg, mb.seg),
                (st.rows, mb.rows),
                (st.targets, mb.targets),
                (st.row_w, mb.row_w),
                (st.pseg, mb.pseg),
                (st.ppos, mb.ppos),
            ):
                src = src.pin_memory() if nb else src
                dst.copy_(src, non_blocking=nb)
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
        self._active = _Active(mb, st, tag, keep, [mb.cost])

    def next_piece_cost(self) -> float:
        return self._active.costs[self._active.next] if self._active is not None else 0.0

    def launch_piece(self) -> Pending | None:
        """Launches the next piece of the active micro-batch; returns its Pending once the last one is launched."""
        a = self._active
        units = a.costs[a.next]
        with self._ctx():
            start = None
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                start.record(self.stream)
            self._whole(a.st)
            a.next += 1
            if self.cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record(self.stream)
                self._piece_events.append(ev)
                self._timings.append((start, ev, units))
            if a.next < len(a.costs):
                return None
            a.st.runs += 1
            host = torch.empty(a.mb.bucket.rows, dtype=torch.float32, pin_memory=self.cuda)
            host.copy_(a.st.row_loss, non_blocking=self.cuda)
            ev = self._record()
        self._active = None
        p = Pending("micro", ev, host, batch=a.mb, keep=a.keep, tag=a.tag)
        self.pending.append(p)
        return p

    def _whole(self, st: _Static) -> None:
        if self.use_graphs and st.graph is None and sum(1 for x in self._static.values() if x.graph) < self.max_graphs:
            self._capture(st)
        if st.graph is not None:
            st.graph.replay()
            self.graph_replays += 1
        else:
            self._forward_backward(st)
            self.eager_runs += 1

    def launch_step(self, tag: object = None) -> Pending:
        """Clip, skip-if-non-finite and AdamW on the device, then zero the accumulators; the norm comes back later."""
        opt, max_norm = self.t.opt, self.t.cfg.max_grad_norm
        nb = self.cuda
        with self._ctx():
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

    def _record(self):
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
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
        """GPU seconds a piece of `units` should take, from the pieces measured so far (0 before any: calibrate)."""
        while self._timings and self._timings[0][1].query():
            start, end, n = self._timings.popleft()
            spu = start.elapsed_time(end) / 1000.0 / max(n, 1e-9)
            self.seconds_per_unit = spu if self.seconds_per_unit is None else 0.8 * self.seconds_per_unit + 0.2 * spu
        return 0.0 if self.seconds_per_unit is None else units * self.seconds_per_unit

    @property
    def inflight(self) -> int:
        """Pieces launched and not finished (one micro-batch = one piece)."""
        if not self.cuda:
            return 0
        while self._piece_events and self._piece_events[0].query():
            self._piece_events.popleft()
        return len(self._piece_events)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def reset(self) -> None:
        """Drops queued results and zeroes the accumulators (a stopped job / a rollback)."""
        self.synchronize()
        self.pending.clear()
        self._active = None
        self._piece_events.clear()
        self._timings.clear()
        with torch.no_grad():
            torch._foreach_zero_(self.acc)


@dataclass
class _Active:
    """The micro-batch whose pieces are being launched."""

    mb: MicroBatch
    st: _Static
    tag: object
    keep: list
    costs: list[float]
    next: int = 0


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
