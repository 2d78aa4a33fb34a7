"""Token-level fused co-serving (FlexLLM): training tokens ride inside serving steps and share their GEMMs.

Why: with CUDA graphs a serving step keeps the GPU busy (small-batch decode re-reads every weight each step), so
training pieces queued between steps only get the TPOT slack (docs/coserving.md). Appending training tokens to a
serving step's batch costs their compute only: the weights are read once for both kinds of token. This module is
the training half of that:

- forward, chunked like chunked prefill: a micro-batch (packed samples, `graphed.pack`) is *armed*; every serving
  step takes up to its leftover token budget of it (`take`, called by the model runner), its rows appended after
  the serving rows. In the step's forward the rider's contexts split every layer: serving rows see the paged KV
  cache and the adapters' segments; training rows see the micro-batch's own earlier keys (and stashed prompt K/V,
  Alchemist) and the job's current LoRA, as one more segment of the step's own shrink/expand over an adapter
  slot the rider holds (`bind_slot`; its own GEMMs when no slot can be spared). Nothing of the training rows
  reaches the KV cache or the sampler.
- what the forward keeps (per layer, training rows only): the layer input and each frozen projection's output
  (before LoRA). That is all the backward needs besides the LoRA weights.
- backward, a few layers per piece, top layer first (pieces launched from the co-serving hooks like graphed.py's):
  the head piece (final norm, logits of the loss rows, weighted CE) gives dL/dh; a layer piece *replays* its
  layers with autograd where every frozen GEMM is replaced by its saved output (`_Given`: forward = the saved
  tensor, backward = grad · W). So the backward computes dX through W, LoRA's grads, and the cheap parts (norms,
  rotary, attention, SiLU) again - never a frozen forward GEMM.
- with no serving traffic there is no step to ride: the armed rows run standalone (the same contexts, no serving
  rows), so a job makes progress on an idle worker too.

The numerics equal `GraphedTrainer`'s (and so `LoRATrainer`'s) on the same micro-batches: tests/cl/test_fused.py.
On a GPU with graphs on, `ModelRunner.attach_rider` captures serving steps that carry `ride_rows` training rows,
and the head / backward pieces are graphs per (bucket, piece). Design and costs: docs/coserving.md.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from lorafleet.worker.layers.lora_context import SegmentLoRAContext
from lorafleet.worker.training.graphed import (
    PREFIX_ALIGN,
    TOKEN_ALIGN,
    GraphedTrainer,
    MaskedPackedAttention,
    MicroBatch,
    _round_up,
)
from lorafleet.worker.training.lora_context import TrainLoRAContext
from lorafleet.worker.training.trainer import LoRATrainer

SCRATCH_SEG = -3  # the scratch row's segment: padded rows of a graphed fused step attend only to it
PAD_SEG = -4  # key rows that pad the key buffer to KEY_ALIGN: no query row sees them
KEY_ALIGN = 16  # the memory-efficient attention kernel wants the mask's key dimension a multiple of this
STALL_STEPS = 8  # serving steps without leftover budget before armed rows run standalone (min share)
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}
RIDE_LORA = ("segments", "own")  # the training rows' LoRA: a segment of serving's shrink/expand, or own GEMMs


class _Given(torch.autograd.Function):
    """A frozen linear whose output is already known: returns it, and passes gradients back through W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return out.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


class _ReplayLoRA(TrainLoRAContext):
    """The backward's LoRA context: the job's LoRA with autograd, frozen products taken from the saved ones."""

    def __init__(self, ft: FusedTrainer) -> None:
        super().__init__(ft.t.lora, ft.t.dtype)
        self.ft = ft

    def base(self, layer_idx: int, site: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _Given.apply(x, weight, self.ft.saved[(layer_idx, site)][: x.shape[0]])


class _RiderAttention:
    """Rows [0, n) are the serving step's; the rest are the micro-batch rows `idx` (device tensor)."""

    def __init__(self, ft: FusedTrainer, serving, n: int, idx: torch.Tensor) -> None:
        self.ft, self.serving, self.n, self.idx = ft, serving, n, idx
        self.mask = ft.step_mask(idx)  # the same for every layer of the step

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = self.n
        train = self.ft.chunk_attend(layer_idx, q[n:], k[n:], v[n:], self.idx, self.mask)
        if n == 0:
            return train
        return torch.cat([self.serving.attend(layer_idx, q[:n], k[:n], v[:n]), train], 0)


def _into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Serving contexts update y in place and return it; copy only when one returned a new tensor."""
    if src.data_ptr() != dst.data_ptr():
        dst.copy_(src)


class _RiderLoRA:
    """Serving rows get the step's adapter segments; training rows the job's LoRA, after their frozen product is
    saved for the backward. With a store slot (`FusedTrainer.bind_slot`) the training rows are one more segment of
    the serving step's own shrink/expand, over all rows at once; otherwise the rider's compute-dtype copy adds it
    (`FusedTrainer.ride_lora`: a shrink and one GEMM per member, per projection group)."""

    def __init__(self, ft: FusedTrainer, serving, n: int, idx: torch.Tensor) -> None:
        self.ft, self.serving, self.n, self.idx = ft, serving, n, idx
        self.segments = ft.segment_context(serving, n, idx.shape[0])

    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = self.n
        self.ft.save(layer_idx, proj, y[n:], self.idx)  # serving's LoRA never touches these rows
        if self.segments is not None:
            _into(y, self.segments.apply(layer_idx, proj, x, y))
            return y
        if self.serving is not None and n:
            _into(y[:n], self.serving.apply(layer_idx, proj, x[:n], y[:n]))
        self.ft.ride_lora(layer_idx, (proj,), x[n:], y[n:])
        return y

    def apply_group(self, layer_idx: int, group: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = self.n
        self.ft.save(layer_idx, group, y[n:], self.idx)
        if self.segments is not None:
            _into(y, self.segments.apply_group(layer_idx, group, x, y))
            return y
        if self.serving is not None and n:
            _into(y[:n], self.serving.apply_group(layer_idx, group, x[:n], y[:n]))
        self.ft.ride_lora(layer_idx, GROUPS[group], x[n:], y[n:])
        return y


def saved_sites(model) -> list[tuple[str, int]]:
    """(site, width) of what the forward keeps per layer and training row: the layer input and each frozen
    projection's output (one per fused group when the model's projections are fused)."""
    s = model.shape
    sites: list[tuple[str, int]] = [("layer_in", s.hidden_size)]
    if model.model.layers[0].self_attn.fused is not None:
        sites += [(g, sum(s.proj_dims(p)[1] for p in members)) for g, members in GROUPS.items()]
    else:
        sites += [(p, s.proj_dims(p)[1]) for members in GROUPS.values() for p in members]
    return sites + [("o_proj", s.hidden_size), ("down_proj", s.hidden_size)]


def buffer_bytes(model, max_tokens: int, max_prefix: int, dtype: torch.dtype) -> int:
    """Device bytes `FusedTrainer` allocates up front for these sizes (saved activations, micro-batch K/V, stashed
    prefix K/V, dL/dh), so a job can size itself to the memory serving left it instead of failing with an OOM. Not
    counted: the compute-dtype copy of the LoRA (rank x (in + out) per adapted projection) and the row / key-window
    index buffers, each under a percent of the rest."""
    s = model.shape
    el = torch.empty((), dtype=dtype).element_size()
    rows = _round_up(max_tokens, TOKEN_ALIGN) + 1
    prefix = _round_up(max_prefix, PREFIX_ALIGN) if max_prefix else 0
    keys = prefix + _round_up(rows, KEY_ALIGN)
    kv = 2 * s.num_layers * s.num_kv_heads * s.head_dim
    per_row = s.num_layers * sum(w for _, w in saved_sites(model)) + 2 * s.hidden_size
    return el * (rows * per_row + keys * kv) + 8 * (rows + 3 * keys)


def tokens_that_fit(model, want: int, max_prefix: int, dtype: torch.dtype, free_bytes: int) -> int:
    """The largest micro-batch (a multiple of TOKEN_ALIGN, at most `want` rounded up) whose buffers fit in
    `free_bytes`; 0 when not even one aligned chunk does."""
    n = _round_up(want, TOKEN_ALIGN)
    while n >= TOKEN_ALIGN and buffer_bytes(model, n, max_prefix, dtype) > free_bytes:
        n -= TOKEN_ALIGN
    return min(n, want) if n >= TOKEN_ALIGN else 0


class FusedTrainer(GraphedTrainer):
    """A `GraphedTrainer` whose forward pieces ride serving steps (see the module docstring).

    Pieces of a micro-batch: [ride, head, backward segments top first]. Launching the ride piece arms the rows;
    `take`/`rows`/`contexts`/`advance` (the model runner) consume them; it is done once every token has been
    forwarded. `serving_busy()` says whether serving steps will come; without them the rows run standalone.

    The forward reads and writes only fixed device buffers, addressed by a device tensor of micro-batch rows
    (`ride_idx`), so the model runner can capture a serving step *with* `ride_rows` training rows in a CUDA graph:
    a step that carries fewer pads with the scratch row `cap` (its own segment: it attends only to itself, and
    what it saves lands in the scratch row)."""

    def __init__(
        self,
        trainer: LoRATrainer,
        max_tokens: int = 1024,
        max_prefix: int = 4096,
        layers_per_piece: int = 2,
        chunk_tokens: int | None = None,
        serving_busy=None,
        ride_rows: int = 128,
        key_window: int | None = 2048,
        ride_lora: str = "segments",
    ) -> None:
        """`ride_lora`: "segments" runs the training rows' LoRA, once attached to a model runner, as a segment of
        the serving step's shrink/expand over a store slot (`bind_slot`); "own" keeps the rider's own GEMMs."""
        if ride_lora not in RIDE_LORA:
            raise ValueError(f"ride_lora must be one of {RIDE_LORA}, got {ride_lora!r}")
        super().__init__(trainer, max_tokens, max_prefix, use_graphs=False, layers_per_piece=1, stream="serving")
        L = trainer.model.shape.num_layers
        self.layers_per_piece = max(1, min(layers_per_piece, L))
        self.stream_mode = "fused"
        self.chunk_tokens = chunk_tokens  # most training rows one step carries (None: whatever the budget leaves)
        self.ride_rows = ride_rows  # rows of a graphed fused step (the runner captures graphs for this many)
        self.serving_busy = serving_busy or (lambda: False)
        self.ride_enabled = True  # False: armed rows wait (or run standalone when serving_busy() says no steps)
        # the latency controller's say on each step (OverlapController.may_ride); None: every step with budget rides
        self.gate: Callable[[], bool] | None = None
        self.last_ride = 0  # training rows the latest step carried (the controller learns what riding costs)
        self._armed = False
        self._stalled = 0  # serving steps in a row that left no budget to armed rows
        self._c0 = 0  # next micro-batch row to forward
        self.rows_ridden = 0  # training rows forwarded inside serving steps (metrics / tests)
        self.rows_standalone = 0
        # head and backward pieces as CUDA graphs, one per (bucket, piece), captured lazily (GPU only)
        self.piece_graphs = self.cuda
        self.max_piece_graphs = 64
        self._piece_graphs: dict = {}
        self._fwd_graph = None  # the standalone forward chunk (ride_rows rows, no serving rows)
        self.key_window = key_window
        self.lora_in_segments = ride_lora == "segments"
        self.store = None  # the serving AdapterStore whose slot `slot` holds the job's LoRA (bind_slot)
        self.slot: int | None = None
        self._alloc()

    # ---- buffers ----
    def _alloc(self) -> None:
        """Everything the forward reads and writes, sized for the largest bucket plus the scratch row, allocated
        outside inference mode (the backward's autograd reads it)."""
        m, d, dt = self.t.model, self.dev, self.t.dtype
        s = m.shape
        cap = _round_up(self.max_tokens, TOKEN_ALIGN)
        self.cap = cap
        rows = cap + 1  # + the scratch row
        long = dict(dtype=torch.long, device=d)
        p = _round_up(self.max_prefix, PREFIX_ALIGN) if self.max_prefix else 0
        self.p = p
        # Keys of the training rows' attention, one buffer per layer: [stashed prefix | micro-batch rows | scratch
        # | pad to KEY_ALIGN], so a step attends with one kernel call (no concatenation, no GQA head copies) and the
        # memory-efficient kernel takes its mask unpadded. Key metadata in the same order; the per-row views
        # (f_seg, f_pos) and the prefix views (f_pseg, f_ppos, f_pk, f_pv) are what `begin` fills.
        nk = p + _round_up(rows, KEY_ALIGN)
        self.kseg = torch.full((nk,), PAD_SEG, **long)
        self.kseg[:p] = -2
        self.kpos = torch.zeros(nk, **long)
        self.korder = torch.cat([torch.full((p,), -1, **long), torch.arange(nk - p, **long)])
        self.f_ids = torch.zeros(rows, **long)
        self.f_seg, self.f_pos = self.kseg[p : p + rows], self.kpos[p : p + rows]
        self.f_seg.fill_(-1)
        self.f_seg[cap] = SCRATCH_SEG
        self.f_pseg, self.f_ppos = self.kseg[:p], self.kpos[:p]
        self.ride_idx = torch.full((max(self.ride_rows, 1),), cap, **long)
        self.kall = torch.zeros(s.num_layers, nk, s.num_kv_heads, s.head_dim, dtype=dt, device=d)
        self.vall = torch.zeros_like(self.kall)
        self.kbuf, self.vbuf = self.kall[:, p : p + rows], self.vall[:, p : p + rows]
        # The keys a step attends to: its chunk's samples' prefix and rows (gathered by `win_idx`, filled by `index`)
        # instead of the whole buffer, which is mostly other samples' keys (a 128-row chunk of 512-token prompts
        # needs ~1.2k of 5k). None: the buffer is no larger than the window, attend to all of it.
        kw = self.key_window
        self.kw = _round_up(kw, KEY_ALIGN) if kw and _round_up(kw, KEY_ALIGN) < nk else None
        self._pad_key = p + cap + 1  # a PAD_SEG key (rows are padded to KEY_ALIGN, so it exists)
        self.win_idx = torch.full((self.kw or 1,), self._pad_key, **long)
        self._full_keys = False  # attend to the whole buffer (a micro-batch whose sample exceeds the window)
        self._row_seg: list[int] = []
        self._pseg_host: list[int] = []
        self._fits = True
        self.f_pk = self.f_pv = None
        if p:
            self.f_pk, self.f_pv = self.kall[:, :p], self.vall[:, :p]
        self.saved: dict[tuple[int, str], torch.Tensor] = {}
        for li in range(s.num_layers):
            for site, width in saved_sites(m):
                self.saved[(li, site)] = torch.zeros(rows, width, dtype=dt, device=d)
        self.saved[(s.num_layers, "final_in")] = torch.zeros(rows, s.hidden_size, dtype=dt, device=d)
        self._alloc_ride_lora()
        self.gbuf = torch.zeros(rows, s.hidden_size, dtype=dt, device=d)  # dL/dh between backward pieces

    def _alloc_ride_lora(self) -> None:
        """The forward's copy of the job's LoRA in the compute dtype. Why: casting the fp32 masters in every
        projection of every ride step cost two kernels per projection per step; the copy is refreshed once per
        armed micro-batch (`refresh_lora`; the masters only change at optimizer steps, launched before the next
        micro-batch is armed). The A's of a q|k|v or gate|up group are one tensor (one shrink GEMM for the group);
        each projection's A is a view of it."""
        lora, dt, dev, r = self.t.lora, self.t.dtype, self.dev, self.t.lora.rank
        shape = self.t.model.shape
        self._ride_a: dict[tuple[int, tuple[str, ...]], torch.Tensor] = {}
        self._ride_b: dict[tuple[int, str], torch.Tensor] = {}
        # (layer, unit) -> adapted members as (proj, first output column, last, slice of x·Aᵀ)
        self._ride_units: dict[tuple[int, tuple[str, ...]], list[tuple[str, int, int, int]]] = {}
        for li in range(shape.num_layers):
            for members in GROUPS.values():
                present = [p for p in members if lora.pair(li, p) is not None]
                if not present:
                    continue
                cat = torch.zeros(len(present) * r, shape.proj_dims(present[0])[0], dtype=dt, device=dev)
                self._ride_a[(li, members)] = cat
                units, lo = [], 0
                for p in members:
                    hi = lo + shape.proj_dims(p)[1]
                    if p in present:
                        k = present.index(p)
                        self._ride_a[(li, (p,))] = cat[k * r : (k + 1) * r]
                        units.append((p, lo, hi, k))
                    lo = hi
                self._ride_units[(li, members)] = units
            for p in lora.targets:
                fin, fout = shape.proj_dims(p)
                if (li, (p,)) not in self._ride_a:
                    self._ride_a[(li, (p,))] = torch.zeros(r, fin, dtype=dt, device=dev)
                self._ride_b[(li, p)] = torch.zeros(fout, r, dtype=dt, device=dev)
                self._ride_units[(li, (p,))] = [(p, 0, fout, 0)]
        self.refresh_lora()

    @torch.no_grad()
    def refresh_lora(self) -> None:
        """Copies the fp32 masters into the forward's compute-dtype copy (the store slot when bound), in stream
        order (after any optimizer step launched before it)."""
        r = self.t.lora.rank
        for (li, p), b in self._ride_b.items():
            a_master, b_master = self.t.lora.pair(li, p)  # type: ignore[misc]
            if self.slot is not None:
                sa, sb = self.store.slot_views(li, p, self.slot)  # type: ignore[union-attr]
                sa[:r].copy_(a_master)
                sb[:, :r].copy_(b_master)
            else:
                self._ride_a[(li, (p,))].copy_(a_master)
                b.copy_(b_master)

    # ---- the training rows as a segment of the serving step's LoRA ----
    def bind_slot(self, store) -> bool:
        """Claims a slot of the serving `store` for the job's LoRA, so a step's training rows are one more segment
        of its shrink/expand (no GEMMs of their own: 11 fewer kernels per layer with fused q|k|v and gate|up).
        False (the rider's own GEMMs stay) when not wanted, when the store cannot hold the job's rank or dtype, when
        it has a single slot (serving's adapters would have none left), or when every slot is pinned by running
        requests. The slot is serving's one fewer while the rider holds it. Called by `ModelRunner.attach_rider`, on
        the engine thread."""
        lora = self.t.lora
        if not self.lora_in_segments or self.slot is not None:
            return self.slot is not None
        if lora.rank > store.max_rank or store.dtype != self.t.dtype or store.device.type != self.dev.type:
            return False
        if store.max_slots < 2:
            return False
        slot = store.claim_slot(lora.targets, lora.scale)
        if slot is None:
            return False
        self.store, self.slot = store, slot  # filled when the next micro-batch is armed (`refresh_lora`)
        return True

    def release_slot(self) -> None:
        if self.slot is not None:
            self.store.release_slot(self.slot)  # type: ignore[union-attr]
        self.store, self.slot = None, None

    def segment_context(self, serving, n: int, k: int) -> SegmentLoRAContext | None:
        """The serving step's LoRA context extended by [gap up to row n: none | rows n..n+k: the job's slot]; None
        without a bound slot. The gap covers a graph's padded serving rows (their segments end at the real count).
        Built on the device with fills and a concatenation, so a CUDA graph can capture it."""
        if self.slot is None:
            return None
        if serving is not None:
            indptr, slots, always = serving.seg_indptr, serving.seg_slots, serving.always
        else:
            indptr = torch.zeros(1, dtype=torch.int32, device=self.dev)
            slots, always = indptr[:0], False
        tail = indptr.new_full((2,), n)
        tail[1] = n + k
        tail_slots = slots.new_full((2,), -1)
        tail_slots[1] = self.slot
        return SegmentLoRAContext(self.store, torch.cat([indptr, tail]), torch.cat([slots, tail_slots]), always)

    def ride_lora(self, layer_idx: int, unit: tuple[str, ...], x: torch.Tensor, y: torch.Tensor) -> None:
        """y += scale · (x·Aᵀ)·Bᵀ for the training rows, in place: one shrink GEMM for the unit (a projection, or a
        q|k|v / gate|up group of a fused model), then one GEMM-with-add per adapted member into its columns."""
        a = self._ride_a.get((layer_idx, unit))
        if a is None:
            return
        xa = (x.to(a.dtype) @ a.t()).to(y.dtype)
        r, scale = self.t.lora.rank, self.t.lora.scale
        for p, lo, hi, k in self._ride_units[(layer_idx, unit)]:
            out = y if len(unit) == 1 else y[:, lo:hi]
            out.addmm_(xa[:, k * r : (k + 1) * r], self._ride_b[(layer_idx, p)].t().to(y.dtype), alpha=scale)

    def save(self, layer_idx: int, site: str, rows: torch.Tensor, idx: torch.Tensor) -> None:
        self.saved[(layer_idx, site)].index_copy_(0, idx, rows.to(self.t.dtype))

    def capture(self, n: int, idx: torch.Tensor):
        def cap(layer_idx: int, site: str, t: torch.Tensor) -> None:
            if site in ("layer_in", "final_in"):
                self.save(layer_idx, site, t[n:], idx)

        return cap

    # ---- the forward of training rows ----
    def step_mask(self, idx: torch.Tensor) -> torch.Tensor:
        """[len(idx) x rep, keys] additive attention mask (0 / -inf) of the micro-batch rows `idx`, built once per
        step for every layer: a row sees its sample's stashed prefix and its sample's rows up to itself (segment ids
        keep samples apart, row order is causal order: samples are packed contiguously). Rows are repeated per query head of a KV
        group, the layout `chunk_attend` hands the kernel. Device tensors only (graph-capturable)."""
        kseg, korder, kpos = self.kseg, self.korder, self.kpos
        if self._windowed:
            kseg, korder, kpos = (x.index_select(0, self.win_idx) for x in (kseg, korder, kpos))
        qseg = self.f_seg.index_select(0, idx)
        mask = (qseg[:, None] == kseg[None, :]) & (korder[None, :] <= idx[:, None])
        window = self.t.model.shape.sliding_window
        if window is not None:
            qpos = self.f_pos.index_select(0, idx)
            mask &= qpos[:, None] - kpos[None, :] < window
        s = self.t.model.shape
        rep = s.num_heads // s.num_kv_heads
        if rep > 1:
            mask = mask.repeat_interleave(rep, 0)
        # additive, in the compute dtype: the kernels would otherwise convert a boolean mask in every layer
        return torch.zeros(mask.shape, dtype=self.kall.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))

    def chunk_attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Micro-batch rows `idx` against [their stashed prefix | their keys so far] (`step_mask`). GQA without
        copying K/V per query head: a KV group's query heads are laid out as extra query rows of that group."""
        self.kbuf[layer_idx].index_copy_(0, idx, k.to(self.kall.dtype))
        self.vbuf[layer_idx].index_copy_(0, idx, v.to(self.vall.dtype))
        t, h, dh = q.shape
        g = k.shape[1]
        rep = h // g
        qg = q.view(t, g, rep, dh).permute(1, 0, 2, 3).reshape(g, t * rep, dh)[None]
        keys, vals = self.kall[layer_idx], self.vall[layer_idx]
        if self._windowed:
            keys, vals = keys.index_select(0, self.win_idx), vals.index_select(0, self.win_idx)
        keys = keys.to(q.dtype).transpose(0, 1)[None]
        vals = vals.to(q.dtype).transpose(0, 1)[None]
        bias = mask[None, None].to(q.dtype)
        out = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=bias, scale=self.t.model.attn_scale)
        return out[0].view(g, t, rep, dh).permute(1, 0, 2, 3).reshape(t, h, dh)

    @property
    def riding(self) -> bool:
        return self._armed

    @property
    def _windowed(self) -> bool:
        return self.kw is not None and not self._full_keys

    def _keys_needed(self, c0: int, k: int) -> tuple[int, int, int, int]:
        """(keys, first prefix key, end of prefix keys, first row key) that rows [c0, c0 + k) attend to: their
        samples' prefixes and rows up to the last of them, plus the scratch key. Samples, their rows and their
        prefixes are packed in the same order, so each range is contiguous."""
        s_lo, s_hi = self._row_seg[c0], self._row_seg[c0 + k - 1]
        p_lo, p_hi = bisect.bisect_left(self._pseg_host, s_lo), bisect.bisect_right(self._pseg_host, s_hi)
        r_lo = bisect.bisect_left(self._row_seg, s_lo)
        return (p_hi - p_lo) + (c0 + k - r_lo) + 1, p_lo, p_hi, r_lo

    def _fit(self, k: int) -> int:
        """The most of the next k rows whose keys fit the window (at least one: `_fits` was checked at arming)."""
        if not self._windowed or k <= 1 or self._keys_needed(self._c0, k)[0] <= self.kw:
            return k
        lo, hi = 1, k
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._keys_needed(self._c0, mid)[0] <= self.kw:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def take(self, serving_tokens: int, budget: int) -> int:
        """Training rows the next step carries: what is armed, within the step's leftover token budget."""
        self.last_ride = 0
        if not self._armed or not self.ride_enabled:
            return 0
        k = min(self._active.mb.tokens - self._c0, budget - serving_tokens)
        if self.chunk_tokens:
            k = min(k, self.chunk_tokens)
        k = self._fit(k)
        self._stalled = 0 if k > 0 else self._stalled + 1
        if k <= 0 or (self.gate is not None and not self.gate()):
            return 0  # a step the latency controller keeps free is not a stall: the rows wait for paid steps
        self.last_ride = k
        return k

    def index(self, k: int, pad_to: int | None = None) -> torch.Tensor:
        """Micro-batch rows of the next `k` tokens; `pad_to`: fill `ride_idx` (graphs) up to it with the scratch
        row, else a fresh tensor of exactly k rows."""
        rows = torch.arange(self._c0, self._c0 + k, dtype=torch.long)
        if self._windowed:
            need, p_lo, p_hi, r_lo = self._keys_needed(self._c0, k)
            p = self.p
            w = torch.full((self.kw,), self._pad_key, dtype=torch.long)
            w[:need] = torch.cat(
                [torch.arange(p_lo, p_hi), torch.arange(p + r_lo, p + self._c0 + k), torch.tensor([p + self.cap])]
            )
            self.win_idx.copy_(w.pin_memory() if self.cuda else w, non_blocking=self.cuda)
        if pad_to is None:
            return rows.to(self.dev)
        idx = torch.full((pad_to,), self.cap, dtype=torch.long)
        idx[:k] = rows
        self.ride_idx[:pad_to].copy_(idx.pin_memory() if self.cuda else idx, non_blocking=self.cuda)
        return self.ride_idx[:pad_to]

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.f_ids.index_select(0, idx), self.f_pos.index_select(0, idx)

    def contexts(self, attn, lora, n: int, idx: torch.Tensor):
        """(attention, LoRA, capture) for a step of `n` serving rows followed by the training rows `idx`."""
        return _RiderAttention(self, attn, n, idx), _RiderLoRA(self, lora, n, idx), self.capture(n, idx)

    def advance(self, k: int, standalone: bool = False) -> None:
        self._c0 += k
        if standalone:
            self.rows_standalone += k
        else:
            self.rows_ridden += k
        if self._c0 >= self._active.mb.tokens:
            self._armed = False
            self._active.next = 1  # the ride piece is done: the head is next

    def _standalone(self) -> None:
        """The armed rows without a serving step (idle worker): chunks of `ride_rows` padded with the scratch row,
        the shape of a fused step, replayed from one CUDA graph on a GPU."""
        while self._armed:
            k = self._fit(min(self._active.mb.tokens - self._c0, self.ride_rows))
            self.index(k, pad_to=self.ride_rows)
            with torch.inference_mode():
                if not self.piece_graphs or self._full_keys:  # the graph attends through the window
                    self._standalone_forward()
                else:
                    if self._fwd_graph is None:
                        self._fwd_graph = self._capture(self._standalone_forward)
                    self._fwd_graph.replay()
                    self.graph_replays += 1
            self.advance(k, standalone=True)

    def _standalone_forward(self) -> None:
        idx = self.ride_idx[: self.ride_rows]
        ids, pos = self.rows(idx)
        attn, lora, cap = self.contexts(None, None, 0, idx)
        self.t.model(ids, pos, attn, lora, cap)

    def _capture(self, fn):
        """Two warm-up runs, then a capture on the training (= serving) stream."""
        for _ in range(2):
            fn()
        g = torch.cuda.CUDAGraph()
        cap = None if self.stream == torch.cuda.default_stream(self.dev) else self.stream
        with torch.cuda.graph(g, pool=self.pool, stream=cap):
            fn()
        return g

    # ---- pieces (the job drives them like GraphedTrainer's) ----
    def begin(self, mb: MicroBatch, tag: object = None) -> None:
        if mb.bucket.tokens > self.cap or mb.bucket.prefix > self.f_pseg.shape[0]:
            raise ValueError(f"micro-batch {mb.bucket} exceeds the fused buffers ({self.cap} tokens)")
        super().begin(mb, tag)
        st, tb, pb = self._active.st, mb.bucket.tokens, mb.bucket.prefix
        with self._ctx():  # the bucket's buffers (backward) -> the fixed forward buffers
            self.f_ids[:tb].copy_(st.ids)
            self.f_pos[:tb].copy_(st.pos)
            self.f_seg[:tb].copy_(st.seg)
            self.f_seg[tb : self.cap].fill_(-1)
            if self.f_pk is not None:
                if pb:
                    self.f_pk[:, :pb].copy_(st.pk)
                    self.f_pv[:, :pb].copy_(st.pv)
                    self.f_pseg[:pb].copy_(st.pseg)
                    self.f_ppos[:pb].copy_(st.ppos)
                self.f_pseg[pb:].fill_(-2)
        L, k = self.t.model.shape.num_layers, self.layers_per_piece
        seg = [mb.tokens * self._layer_unit * min(k, L - lo) for lo in range(0, L, k)]
        self._active.costs = [float(mb.tokens), self._head_unit * len(mb.owners), *reversed(seg)]
        self._c0 = 0
        self._armed = False
        # host copies for the key window: row -> sample, and the prefix keys' samples (both ascending)
        self._row_seg = mb.seg[: mb.tokens].tolist()
        self._pseg_host = [x for x in mb.pseg.tolist() if x >= 0]
        self._fits = self.kw is None or all(
            self._keys_needed(r, 1)[0] <= self.kw
            for r in range(mb.tokens)
            if r + 1 == mb.tokens or self._row_seg[r + 1] != self._row_seg[r]
        )

    def predict_seconds(self, units: float) -> float:
        """The ride piece costs no separate GPU time: its rows are paid inside serving steps, whose measured time
        the controller already answers to. Other pieces as measured."""
        if self._active is not None and self._active.next == 0:
            return 0.0
        return super().predict_seconds(units)

    def _ride(self) -> bool:
        """Leave armed rows to serving steps? Not when none will come, nor when full steps starved them."""
        return self.serving_busy() and self._stalled < STALL_STEPS

    def next_piece_cost(self) -> float:
        if self._armed and self._ride():
            return float("inf")  # rows are riding serving steps: nothing to launch until they are through
        if self._active is not None and self._active.next == 0 and self._ride():
            # arming spends nothing now: each step's rows are taken from that step's own leftover (`take`), so a
            # micro-batch larger than one iteration's leftover must still be armed (it was never, under a busy step)
            return 0.0
        return super().next_piece_cost()

    def launch_piece(self):
        a = self._active
        if a.next == 0:
            if not self._armed:
                with self._ctx():
                    self.refresh_lora()  # this micro-batch's forward runs on the weights of the latest step
                self._armed = True
                self._stalled = 0
                if self._ride() and self._fits:
                    return None  # the next serving steps carry the rows
            self._full_keys = not self._fits  # a sample's keys exceed the window: eagerly, over every key
            try:
                self._standalone()
            finally:
                self._full_keys = False
            return None
        return super().launch_piece()

    def _split_piece(self, a) -> None:
        for p, acc in zip(self.params, self.acc, strict=True):
            if p.grad is not acc:  # backward accumulates in place into the accumulators
                p.grad = acc
        key = (a.mb.bucket, a.next)
        g = self._piece_graphs.get(key)
        if g is None and self.piece_graphs and len(self._piece_graphs) < self.max_piece_graphs:
            g = self._capture_piece(a, a.next)
        if g is not None:
            g.replay()
            self.graph_replays += 1
        else:
            self._piece(a.st, a.next)
            self.eager_runs += 1

    def _piece(self, st, i: int) -> None:
        """Piece i >= 1 of a micro-batch in bucket `st`: 1 = the head, then layer groups top first. Reads and writes
        only fixed buffers (dL/dh travels in `gbuf`), so it can be a CUDA graph."""
        L, k = self.t.model.shape.num_layers, self.layers_per_piece
        if i == 1:
            self._head(st)
        else:
            hi = L - (i - 2) * k
            self._layers_backward(st, max(0, hi - k), hi)

    def _capture_piece(self, a, i: int):
        """Warm-up with zero gradients (the accumulators get exact zeros), then capture on the serving stream."""
        st = a.st
        saved_w, saved_g = st.row_w.clone(), self.gbuf.clone()
        st.row_w.zero_()
        self.gbuf.zero_()
        g = self._capture(lambda: self._piece(st, i))
        st.row_w.copy_(saved_w)
        self.gbuf.copy_(saved_g)
        self._piece_graphs[(a.mb.bucket, i)] = g
        return g

    def _head(self, st) -> None:
        m = self.t.model
        tb = st.seg.shape[0]
        h = self.saved[(m.shape.num_layers, "final_in")][:tb].detach().requires_grad_(True)
        tok = F.cross_entropy(m.compute_logits(m.model.norm(h).index_select(0, st.rows)), st.targets, reduction="none")
        st.row_loss.copy_(tok.detach())
        (tok * st.row_w).sum().backward()
        self.gbuf[:tb].copy_(h.grad)

    def _layers_backward(self, st, lo: int, hi: int) -> None:
        m = self.t.model
        tb = st.seg.shape[0]
        grad = self.gbuf[:tb].clone()
        attn = MaskedPackedAttention(st, m.attn_scale, m.shape.sliding_window, repeat_kv=self.cuda)
        ctx = _ReplayLoRA(self)
        for li in range(hi - 1, lo - 1, -1):
            r0 = self.saved[(li, "layer_in")][:tb].detach().requires_grad_(True)
            out = m.model.layers[li](r0, st.pos, attn, ctx, None)
            torch.autograd.backward(out, grad)
            grad = r0.grad
        self.gbuf[:tb].copy_(grad)

    def reset(self) -> None:
        super().reset()
        self._armed = False
        self._stalled = 0
        self._c0 = 0
