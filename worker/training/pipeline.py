"""An accumulation group of training samples executed in budgeted pieces across serving iterations (FlexLLM).

Forward: samples are packed into chunks of whole samples (one flat token batch each, per-sample constant prefixes
from the stash, `PackedPrefixAttention`), so a piece costs few kernel launches; a sample too long for the budget
at hand is cut into token chunks like chunked prefill, each attending to the K/V of its earlier chunks (kept *with*
their autograd graph, so gradients flow across chunks exactly) and to its prefix. Backward: the graph is segmented
at layer boundaries (each layer's input is a detached leaf), so the backward runs a few layers per iteration, top
layer first:
    head pieces:   norm + lm_head + masked, weighted CE per chunk, backward into the top leaves (logits never kept)
    layer pieces:  autograd.backward(outputs of layer l, grads of layer l+1's leaves), one *component* at a time
                   (a packed chunk, or all token chunks of one long sample: they share K/V within a layer)
The gradients equal one monolithic backward (tests check against `LoRATrainer`).
Memory: the base is frozen, so for the LoRA path autograd keeps x and x·Aᵀ per projection (FlexLLM's pruning) plus
what the input-gradient path through the frozen layers needs.

Costs are in token units (1 unit = forward of one token through the model): a forward chunk of n tokens costs n, a
layer piece over T tokens ≈ T·P_layer/P_model (input gradients only), a head piece ≈ 2·n·P_head/P_model. A piece
runs only if it fits the budget it is given, so a co-serving iteration never exceeds its token budget; the largest
piece is bounded by one sample (or one chunk), see `max_piece_cost`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lorafleet.worker.layers.attention import DenseAttentionContext
from lorafleet.worker.training.attention import PackedPrefixAttention
from lorafleet.worker.training.trainer import LoRATrainer, TrainSample


@dataclass
class _Chunk:
    ids: torch.Tensor
    pos: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor  # sample index of every row
    component: int
    packed: PackedPrefixAttention | None = None  # whole samples
    long_sample: int | None = None  # token chunk of this sample
    outs: list[torch.Tensor] = field(default_factory=list)
    leaves: list[torch.Tensor | None] = field(default_factory=list)


class LayerwiseGroup:
    def __init__(self, trainer: LoRATrainer, samples: list[TrainSample], denom: int, min_chunk: int = 32) -> None:
        self.t = trainer
        self.min_chunk = min_chunk  # smallest token chunk worth its launch cost when a sample must be split
        self.samples = samples
        self.denom = max(1, denom)
        m = trainer.model
        self.L = m.shape.num_layers
        self.inputs = [trainer.sequence_inputs(s) for s in samples]
        self.lens = [int(x[0].shape[0]) for x in self.inputs]
        self.prefixes = [x[3] if x[3] is not None and x[3][0][0].shape[0] > 0 else None for x in self.inputs]
        self.next_sample = 0
        self.long: tuple[int, int] | None = None  # (sample, tokens forwarded) while token-chunking a sample
        self.long_kv: dict[int, list[list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self.chunks: list[_Chunk] = []
        self.components: list[list[int]] = []  # chunk indices per backward component
        self.stage = self.L  # L = head pieces; L-1 .. 0 = layer pieces; -1 = done
        self.cursor = 0  # chunk (head) or component (layer) within the stage
        self.loss_sum = 0.0
        self.sample_loss = torch.zeros(len(samples), dtype=torch.float64)
        p_layer = sum(p.numel() for p in m.model.layers[0].parameters())
        p_head = m.lm_head.weight.numel()
        p_model = self.L * p_layer + p_head
        self.layer_unit = p_layer / p_model
        self.head_unit = 2.0 * p_head / p_model

    # ---- bookkeeping ----
    @property
    def done(self) -> bool:
        return self.stage < 0

    @property
    def forward_done(self) -> bool:
        return self.long is None and self.next_sample >= len(self.samples)

    @property
    def tokens(self) -> int:
        return sum(self.lens)

    def max_piece_cost(self) -> float:
        """The most a single piece can cost: a budget at least this large always makes progress."""
        longest = max(self.lens)
        return max(1.0, self.layer_unit * longest, self.head_unit * longest)

    def _component_tokens(self, comp: list[int]) -> int:
        return sum(int(self.chunks[c].ids.shape[0]) for c in comp)

    def next_cost(self) -> float:
        if not self.forward_done:
            return 1.0
        if self.stage == self.L:
            return self.head_unit * int(self.chunks[self.cursor].ids.shape[0])
        return self.layer_unit * self._component_tokens(self.components[self.cursor])

    def work(self, budget: float) -> float:
        """Runs pieces while they fit in `budget` token units; returns the units used."""
        used = 0.0
        while not self.done:
            left = budget - used
            if not self.forward_done:
                n = self._forward_piece(left)
                if n <= 0:
                    break
                used += n
                continue
            cost = self.next_cost()
            if cost > left:
                break
            if self.stage == self.L:
                self._head_piece(self.chunks[self.cursor])
                self.cursor += 1
                if self.cursor == len(self.chunks):
                    self.stage, self.cursor = self.L - 1, 0
            else:
                self._layer_piece(self.stage, self.components[self.cursor])
                self.cursor += 1
                if self.cursor == len(self.components):
                    self.stage, self.cursor = self.stage - 1, 0
            used += cost
        return used

    def run_all(self) -> float:
        while not self.done:
            self.work(float("inf"))
        return self.loss_sum

    # ---- forward ----
    def _forward_piece(self, left: float) -> int:
        if self.long is not None:
            s, done = self.long
            n = int(min(left, self.lens[s] - done))
            if n <= 0:
                return 0
            self._forward_long_chunk(s, done, done + n)
            self.long = None if done + n == self.lens[s] else (s, done + n)
            return n
        take, size = [], 0
        while self.next_sample + len(take) < len(self.samples):
            n = self.lens[self.next_sample + len(take)]
            if size + n > left:
                break
            take.append(self.next_sample + len(take))
            size += n
        if take:
            self.next_sample += len(take)
            self._forward_packed(take)
            return size
        s = self.next_sample
        n = int(min(left, self.lens[s]))
        if n < 1 or (n < self.lens[s] and n < min(self.min_chunk, self.lens[s])):
            return 0  # too little budget to start a token chunk worth its launch cost: wait
        self.next_sample += 1
        self.long_kv[s] = [[] for _ in range(self.L)]
        self.components.append([])
        self.long = (s, 0)
        return self._forward_piece(left)

    def _run_layers(self, chunk: _Chunk, attn_for) -> None:
        m, ctx = self.t.model, self.t.ctx
        h = m.model.embed_tokens(chunk.ids)
        chunk.leaves.append(None)
        for li, layer in enumerate(m.model.layers):
            if li > 0:
                h = h.detach().requires_grad_(True)
                chunk.leaves.append(h)
            h = layer(h, chunk.pos, attn_for(li), ctx, None)
            chunk.outs.append(h)
        chunk.leaves.append(h.detach().requires_grad_(True))

    def _forward_packed(self, idx: list[int]) -> None:
        ids = torch.cat([self.inputs[i][0] for i in idx])
        pos = torch.cat([self.inputs[i][1] for i in idx])
        tg = torch.cat([self.inputs[i][2] for i in idx])
        lens = [self.lens[i] for i in idx]
        owner = torch.repeat_interleave(torch.tensor(idx), torch.tensor(lens)).to(ids.device)
        attn = PackedPrefixAttention(
            self.t.model.attn_scale,
            lens,
            [self.prefixes[i] for i in idx],
            ids.device,
            sliding_window=self.t.model.shape.sliding_window,
        )
        chunk = _Chunk(ids, pos, tg, owner, len(self.components), packed=attn)
        self.components.append([len(self.chunks)])
        self.chunks.append(chunk)
        self._run_layers(chunk, lambda _li: attn)

    def _forward_long_chunk(self, s: int, lo: int, hi: int) -> None:
        ids, pos, tg, _ = self.inputs[s]
        owner = torch.full((hi - lo,), s, dtype=torch.long, device=ids.device)
        comp = len(self.components) - 1
        chunk = _Chunk(ids[lo:hi], pos[lo:hi], tg[lo:hi], owner, comp, long_sample=s)
        self.components[comp].append(len(self.chunks))
        self.chunks.append(chunk)
        kv = self.long_kv[s]
        prefix = self.prefixes[s]
        m = self.t.model

        def attn_for(li: int):
            parts_k = [c[0] for c in kv[li]]
            parts_v = [c[1] for c in kv[li]]
            if prefix is not None:
                parts_k.insert(0, prefix[li][0])
                parts_v.insert(0, prefix[li][1])
            plist = None
            if parts_k:
                plist = [None] * self.L
                plist[li] = (torch.cat(parts_k, 0), torch.cat(parts_v, 0))
            return _Recording(
                DenseAttentionContext(m.attn_scale, prefix_kv=plist, sliding_window=m.shape.sliding_window),
                kv[li],
            )

        self._run_layers(chunk, attn_for)

    # ---- backward ----
    def _head_piece(self, chunk: _Chunk) -> None:
        m = self.t.model
        leaf = chunk.leaves[self.L]
        rows = chunk.targets >= 0
        if not bool(rows.any()):
            leaf.grad = torch.zeros_like(leaf)
            return
        logits = m.compute_logits(m.model.norm(leaf)[rows])
        tok = F.cross_entropy(logits, chunk.targets[rows], reduction="none")
        owner = chunk.owner[rows]
        w = torch.tensor([s.weight for s in self.samples], device=tok.device, dtype=tok.dtype)[owner]
        loss = (tok * w).sum()
        (loss / self.denom).backward()
        self.loss_sum += float(loss.detach())
        self.sample_loss.index_add_(0, owner.cpu(), (tok * w).detach().double().cpu())

    def _layer_piece(self, li: int, comp: list[int]) -> None:
        outs, grads = [], []
        for c in comp:
            ch = self.chunks[c]
            leaf = ch.leaves[li + 1]
            outs.append(ch.outs[li])
            grads.append(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))
        torch.autograd.backward(outs, grad_tensors=grads)
        for c in comp:  # free what this layer held
            ch = self.chunks[c]
            ch.outs[li] = None  # type: ignore[call-overload]
            ch.leaves[li + 1] = None
        if self.chunks[comp[0]].long_sample is not None:
            self.long_kv[self.chunks[comp[0]].long_sample][li] = []


class _Recording:
    """Wraps a dense attention context and keeps this chunk's K/V (with graph) for the sample's later chunks."""

    def __init__(self, inner: DenseAttentionContext, store: list) -> None:
        self.inner = inner
        self.store = store

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.store.append((k, v))
        return self.inner.attend(layer_idx, q, k, v)


class LayerwiseSequence(LayerwiseGroup):
    """A group of one sample (kept for callers and tests that think in sequences)."""

    def __init__(self, trainer: LoRATrainer, sample: TrainSample, denom: int) -> None:
        super().__init__(trainer, [sample], denom, min_chunk=1)
        self.sample = sample
        self.n = self.lens[0]

    @property
    def bounds(self) -> list[tuple[int, int]]:
        out, lo = [], 0
        for ch in self.chunks:
            out.append((lo, lo + int(ch.ids.shape[0])))
            lo += int(ch.ids.shape[0])
        return out
