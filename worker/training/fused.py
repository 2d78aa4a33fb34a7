"""Token-level fused co-serving (FlexLLM): training tokens ride inside serving steps and share their GEMMs.

Why: with CUDA graphs a serving step keeps the GPU busy (small-batch decode re-reads every weight each step), so
training pieces queued between steps only get the TPOT slack (docs/coserving.md). Appending training tokens to a
serving step's batch costs their compute only: the weights are read once for both kinds of token. This module is
the training half of that:

- forward, chunked like chunked prefill: a micro-batch (packed samples, `graphed.pack`) is *armed*; every serving
  step takes up to its leftover token budget of it (`take`, called by the model runner), its rows appended after
  the serving rows. In the step's forward the rider's contexts split every layer: serving rows see the paged KV
  cache and the adapters' segments; training rows see the micro-batch's own earlier keys (and stashed prompt K/V,
  Alchemist) and the job's current LoRA. Nothing of the training rows reaches the KV cache or the sampler.
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
Fused steps run eagerly for now (a step carrying training rows skips the serving CUDA graphs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lorafleet.worker.training.graphed import GraphedTrainer, MaskedPackedAttention, MicroBatch, _round_up
from lorafleet.worker.training.lora_context import TrainLoRAContext
from lorafleet.worker.training.trainer import LoRATrainer

STALL_STEPS = 8  # serving steps without leftover budget before armed rows run standalone (min share)
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


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
    """Rows [0, n) are the serving step's, the rest a chunk of the micro-batch starting at micro-batch row c0."""

    def __init__(self, ft: FusedTrainer, serving, n: int, c0: int) -> None:
        self.ft, self.serving, self.n, self.c0 = ft, serving, n, c0

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = self.n
        train = self.ft.chunk_attend(layer_idx, q[n:], k[n:], v[n:], self.c0)
        if n == 0:
            return train
        return torch.cat([self.serving.attend(layer_idx, q[:n], k[:n], v[:n]), train], 0)


def _into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Serving contexts update y in place and return it; copy only when one returned a new tensor."""
    if src.data_ptr() != dst.data_ptr():
        dst.copy_(src)


class _RiderLoRA:
    """Serving rows get the step's adapter segments; training rows the job's LoRA, after their frozen product is
    saved for the backward."""

    def __init__(self, ft: FusedTrainer, serving, n: int, c0: int) -> None:
        self.ft, self.serving, self.n, self.c0 = ft, serving, n, c0
        self.train = TrainLoRAContext(ft.t.lora, ft.t.dtype)

    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = self.n
        if self.serving is not None and n:
            _into(y[:n], self.serving.apply(layer_idx, proj, x[:n], y[:n]))
        self.ft.save(layer_idx, proj, y[n:], self.c0)
        y[n:] = self.train.apply(layer_idx, proj, x[n:], y[n:])
        return y

    def apply_group(self, layer_idx: int, group: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = self.n
        if self.serving is not None and n:
            _into(y[:n], self.serving.apply_group(layer_idx, group, x[:n], y[:n]))
        self.ft.save(layer_idx, group, y[n:], self.c0)
        lo = 0
        for proj in GROUPS[group]:
            hi = lo + self.ft.t.model.shape.proj_dims(proj)[1]
            y[n:, lo:hi] = self.train.apply(layer_idx, proj, x[n:], y[n:, lo:hi])
            lo = hi
        return y


class FusedTrainer(GraphedTrainer):
    """A `GraphedTrainer` whose forward pieces ride serving steps (see the module docstring).

    Pieces of a micro-batch: [ride, head, backward segments top first]. Launching the ride piece arms the rows;
    `take`/`contexts`/`advance` (the model runner) consume them; it is done once every token has been forwarded.
    `serving_busy()` says whether serving steps will come; without them the rows run standalone."""

    def __init__(
        self,
        trainer: LoRATrainer,
        max_tokens: int = 1024,
        max_prefix: int = 4096,
        layers_per_piece: int = 2,
        chunk_tokens: int | None = None,
        serving_busy=None,
    ) -> None:
        super().__init__(trainer, max_tokens, max_prefix, use_graphs=False, layers_per_piece=1, stream="serving")
        L = trainer.model.shape.num_layers
        self.layers_per_piece = max(1, min(layers_per_piece, L))
        self.stream_mode = "fused"
        self.chunk_tokens = chunk_tokens  # most training rows one step carries (None: whatever the budget leaves)
        self.serving_busy = serving_busy or (lambda: False)
        self._armed = False
        self._stalled = 0  # serving steps in a row that left no budget to armed rows
        self._c0 = 0  # next micro-batch row to forward
        self.rows_ridden = 0  # training rows forwarded inside serving steps (metrics / tests)
        self.rows_standalone = 0
        self._alloc()

    # ---- buffers ----
    def _alloc(self) -> None:
        """Everything the forward writes, sized for the largest bucket and allocated outside inference mode (the
        backward's autograd reads it)."""
        m, d, dt = self.t.model, self.dev, self.t.dtype
        s = m.shape
        cap = _round_up(self.max_tokens, 128)
        self.cap = cap
        self.kbuf = torch.zeros(s.num_layers, cap, s.num_kv_heads, s.head_dim, dtype=dt, device=d)
        self.vbuf = torch.zeros_like(self.kbuf)
        self.saved: dict[tuple[int, str], torch.Tensor] = {}
        fused = m.model.layers[0].self_attn.fused is not None
        sites: list[tuple[str, int]] = [("layer_in", s.hidden_size)]
        if fused:
            sites += [(g, sum(s.proj_dims(p)[1] for p in members)) for g, members in GROUPS.items()]
        else:
            sites += [(p, s.proj_dims(p)[1]) for members in GROUPS.values() for p in members]
        sites += [("o_proj", s.hidden_size), ("down_proj", s.hidden_size)]
        for li in range(s.num_layers):
            for site, width in sites:
                self.saved[(li, site)] = torch.zeros(cap, width, dtype=dt, device=d)
        self.saved[(s.num_layers, "final_in")] = torch.zeros(cap, s.hidden_size, dtype=dt, device=d)

    def save(self, layer_idx: int, site: str, rows: torch.Tensor, c0: int) -> None:
        self.saved[(layer_idx, site)][c0 : c0 + rows.shape[0]].copy_(rows)

    def capture(self, n: int, c0: int):
        def cap(layer_idx: int, site: str, t: torch.Tensor) -> None:
            if site in ("layer_in", "final_in"):
                self.save(layer_idx, site, t[n:], c0)

        return cap

    # ---- the forward of training rows ----
    def chunk_attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c0: int):
        """Rows c0.. of the micro-batch against [its stashed prefix | its keys so far]; segment ids keep samples
        apart, row order is causal order within a sample (samples are packed contiguously)."""
        st = self._active.st
        n = q.shape[0]
        tb = st.seg.shape[0]
        self.kbuf[layer_idx, c0 : c0 + n] = k
        self.vbuf[layer_idx, c0 : c0 + n] = v
        keys, vals = self.kbuf[layer_idx, :tb], self.vbuf[layer_idx, :tb]
        qseg, qidx = st.seg[c0 : c0 + n], torch.arange(c0, c0 + n, device=q.device)
        mask = (qseg[:, None] == st.seg[None, :]) & (torch.arange(tb, device=q.device)[None, :] <= qidx[:, None])
        window = self.t.model.shape.sliding_window
        if window is not None:
            mask &= st.pos[c0 : c0 + n, None] - st.pos[None, :] < window
        if st.pk is not None:
            mp = qseg[:, None] == st.pseg[None, :]
            if window is not None:
                mp &= st.pos[c0 : c0 + n, None] - st.ppos[None, :] < window
            mask = torch.cat([mp, mask], 1)
            keys = torch.cat([st.pk[layer_idx].to(k.dtype), keys], 0)
            vals = torch.cat([st.pv[layer_idx].to(v.dtype), vals], 0)
        q4, k4, v4 = q.transpose(0, 1)[None], keys.transpose(0, 1)[None], vals.transpose(0, 1)[None]
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k4, v4 = k4.repeat_interleave(rep, dim=1), v4.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask[None, None], scale=self.t.model.attn_scale)
        return out[0].transpose(0, 1)

    @property
    def riding(self) -> bool:
        return self._armed

    def take(self, serving_tokens: int, budget: int) -> int:
        """Training rows the next step carries: what is armed, within the step's leftover token budget."""
        if not self._armed:
            return 0
        k = min(self._active.mb.tokens - self._c0, budget - serving_tokens)
        if self.chunk_tokens:
            k = min(k, self.chunk_tokens)
        self._stalled = 0 if k > 0 else self._stalled + 1
        return max(0, k)

    def rows(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        st = self._active.st
        return st.ids[self._c0 : self._c0 + k], st.pos[self._c0 : self._c0 + k]

    def contexts(self, attn, lora, n: int):
        """(attention, LoRA, capture) for a step of `n` serving rows followed by the training rows of `rows`."""
        c0 = self._c0
        return _RiderAttention(self, attn, n, c0), _RiderLoRA(self, lora, n, c0), self.capture(n, c0)

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
        """The armed rows without a serving step (idle worker)."""
        k = self._active.mb.tokens - self._c0
        ids, pos = self.rows(k)
        attn, lora, cap = self.contexts(None, None, 0)
        with torch.inference_mode():
            self.t.model(ids, pos, attn, lora, cap)
        self.advance(k, standalone=True)

    # ---- pieces (the job drives them like GraphedTrainer's) ----
    def begin(self, mb: MicroBatch, tag: object = None) -> None:
        if mb.bucket.tokens > self.cap:
            raise ValueError(f"micro-batch of {mb.bucket.tokens} tokens exceeds the fused buffers ({self.cap})")
        super().begin(mb, tag)
        L, k = self.t.model.shape.num_layers, self.layers_per_piece
        seg = [mb.tokens * self._layer_unit * min(k, L - lo) for lo in range(0, L, k)]
        self._active.costs = [float(mb.tokens), self._head_unit * len(mb.owners), *reversed(seg)]
        self._c0 = 0
        self._armed = False

    def _ride(self) -> bool:
        """Leave armed rows to serving steps? Not when none will come, nor when full steps starved them."""
        return self.serving_busy() and self._stalled < STALL_STEPS

    def next_piece_cost(self) -> float:
        if self._armed and self._ride():
            return float("inf")  # rows are riding serving steps: nothing to launch until they are through
        return super().next_piece_cost()

    def launch_piece(self):
        a = self._active
        if a.next == 0:
            if not self._armed:
                self._armed = True
                self._stalled = 0
                if self._ride():
                    return None  # the next serving steps carry the rows
            self._standalone()
            return None
        return super().launch_piece()

    def _split_piece(self, a) -> None:
        for p, acc in zip(self.params, self.acc, strict=True):
            if p.grad is not acc:  # backward accumulates in place into the accumulators
                p.grad = acc
        L, k = self.t.model.shape.num_layers, self.layers_per_piece
        if a.next == 1:
            self._head(a)
        else:
            hi = L - (a.next - 2) * k
            self._layers_backward(a, max(0, hi - k), hi)
        self.eager_runs += 1

    def _head(self, a) -> None:
        m, st = self.t.model, a.st
        tb = st.seg.shape[0]
        h = self.saved[(m.shape.num_layers, "final_in")][:tb].detach().requires_grad_(True)
        tok = F.cross_entropy(m.compute_logits(m.model.norm(h).index_select(0, st.rows)), st.targets, reduction="none")
        st.row_loss.copy_(tok.detach())
        (tok * st.row_w).sum().backward()
        a.inputs = [h.grad]

    def _layers_backward(self, a, lo: int, hi: int) -> None:
        m, st = self.t.model, a.st
        tb = st.seg.shape[0]
        grad = a.inputs[0]
        attn = MaskedPackedAttention(st, m.attn_scale, m.shape.sliding_window, repeat_kv=self.cuda)
        ctx = _ReplayLoRA(self)
        for li in range(hi - 1, lo - 1, -1):
            r0 = self.saved[(li, "layer_in")][:tb].detach().requires_grad_(True)
            out = m.model.layers[li](r0, st.pos, attn, ctx, None)
            torch.autograd.backward(out, grad)
            grad = r0.grad
        a.inputs = [grad]

    def reset(self) -> None:
        super().reset()
        self._armed = False
        self._stalled = 0
        self._c0 = 0
