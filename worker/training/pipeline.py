"""One training sequence executed in budgeted pieces across serving iterations (FlexLLM).

Forward: the sequence is cut into chunks like chunked prefill; every chunk runs through all layers, attending to the
K/V of the earlier chunks (kept *with* their autograd graph, so gradients flow across chunks exactly) and to an
optional constant prefix (a stashed prompt). Backward: the graph is segmented at layer boundaries (each layer's
input is a detached leaf), so the backward can run a few layers per iteration, top layer first:
    head stage:   norm + lm_head + masked loss per chunk, backward into the top leaves
    layer stage l: autograd.backward(outputs of layer l for all chunks, grads of layer l+1's leaves)
The result is bit-compatible with one monolithic backward (a test checks gradients against `LoRATrainer`).
Memory: the base is frozen, so autograd keeps for the LoRA path only x and x·Aᵀ per projection (FlexLLM's pruning)
plus what the input-gradient path through the frozen layer needs; the head's logits are never kept (the head stage
recomputes them and backprops at once).

Costs are in *token units* (1 unit = forward of one token through the whole model): a forward chunk of n tokens
costs n, a layer's backward over T tokens ≈ T·P_layer / P_model (input gradients only, weights are frozen), the
head stage (run chunk by chunk) ≈ 2·n·P_head / P_model. A piece runs only if it fits the budget it is given, so a co-serving
iteration never exceeds its token budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lorafleet.worker.layers.attention import DenseAttentionContext
from lorafleet.worker.training.trainer import LoRATrainer, TrainSample


class LayerwiseSequence:
    def __init__(self, trainer: LoRATrainer, sample: TrainSample, denom: int) -> None:
        self.t = trainer
        self.sample = sample
        self.denom = max(1, denom)
        m = trainer.model
        self.L = m.shape.num_layers
        self.ids, self.pos, self.targets, prefix = trainer.sequence_inputs(sample)
        if prefix is not None and prefix[0][0].shape[0] == 0:
            prefix = None
        self.prefix = prefix
        self.n = int(self.ids.shape[0])
        self.fwd_done = 0
        self.kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(self.L)]
        self.leaves: list[list[torch.Tensor]] = [[] for _ in range(self.L + 1)]
        self.outs: list[list[torch.Tensor]] = [[] for _ in range(self.L)]
        self.bounds: list[tuple[int, int]] = []
        self.next_stage = self.L  # L = head stage; then L-1 .. 0; -1 = done
        self.head_chunk = 0  # the head stage runs chunk by chunk (its cost grows with the vocabulary)
        self.loss_sum = 0.0
        p_layer = sum(p.numel() for p in m.model.layers[0].parameters())
        p_head = m.lm_head.weight.numel()
        p_model = self.L * p_layer + p_head
        self.layer_unit = p_layer / p_model
        self.head_unit = 2.0 * p_head / p_model

    @property
    def done(self) -> bool:
        return self.next_stage < 0

    @property
    def forward_done(self) -> bool:
        return self.fwd_done >= self.n

    def next_cost(self) -> float:
        if not self.forward_done:
            return 1.0
        if self.next_stage == self.L:
            lo, hi = self.bounds[self.head_chunk]
            return self.head_unit * (hi - lo)
        return self.layer_unit * self.n

    def work(self, budget: float) -> float:
        """Runs pieces while they fit in `budget` token units; returns the units used."""
        used = 0.0
        while not self.done:
            left = budget - used
            if not self.forward_done:
                n = int(min(left, self.n - self.fwd_done))
                if n <= 0:
                    break
                self._forward_chunk(n)
                used += n
                continue
            cost = self.next_cost()
            if cost > left:
                break
            if self.next_stage == self.L:
                self._head_chunk(self.head_chunk)
                self.head_chunk += 1
                if self.head_chunk == len(self.bounds):
                    self.next_stage -= 1
            else:
                self._layer_stage(self.next_stage)
                self.next_stage -= 1
            used += cost
        return used

    def max_piece_cost(self) -> float:
        """The most a single piece can cost: a co-serving floor at least this large guarantees progress."""
        return max(1.0, self.layer_unit * self.n, self.head_unit * self.n)

    def run_all(self) -> float:
        while not self.done:
            self.work(float("inf"))
        return self.loss_sum

    # ---- pieces ----
    def _forward_chunk(self, n: int) -> None:
        lo, hi = self.fwd_done, self.fwd_done + n
        m, ctx = self.t.model, self.t.ctx
        pos = self.pos[lo:hi]
        h = m.model.embed_tokens(self.ids[lo:hi])
        cur: dict[str, torch.Tensor] = {}

        def capture(_layer: int, site: str, t: torch.Tensor) -> None:
            if site in ("k", "v"):
                cur[site] = t

        for li, layer in enumerate(m.model.layers):
            if li > 0:
                h = h.detach().requires_grad_(True)
                self.leaves[li].append(h)
            parts_k = [c[0] for c in self.kv[li]]
            parts_v = [c[1] for c in self.kv[li]]
            if self.prefix is not None:
                parts_k.insert(0, self.prefix[li][0])
                parts_v.insert(0, self.prefix[li][1])
            prefix_list = None
            if parts_k:
                prefix_list = [None] * self.L
                prefix_list[li] = (torch.cat(parts_k, 0), torch.cat(parts_v, 0))
            attn = DenseAttentionContext(m.attn_scale, prefix_kv=prefix_list, sliding_window=m.shape.sliding_window)
            cur.clear()
            h = layer(h, pos, attn, ctx, capture)
            self.kv[li].append((cur["k"], cur["v"]))
            self.outs[li].append(h)
        self.leaves[self.L].append(h.detach().requires_grad_(True))
        self.bounds.append((lo, hi))
        self.fwd_done = hi

    def _head_chunk(self, c: int) -> None:
        m = self.t.model
        leaf = self.leaves[self.L][c]
        lo, hi = self.bounds[c]
        tg = self.targets[lo:hi]
        rows = tg >= 0
        if not bool(rows.any()):
            leaf.grad = torch.zeros_like(leaf)
            return
        logits = m.compute_logits(m.model.norm(leaf)[rows])
        loss = F.cross_entropy(logits, tg[rows], reduction="sum") * self.sample.weight
        (loss / self.denom).backward()
        self.loss_sum += float(loss.detach())

    def _layer_stage(self, li: int) -> None:
        grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in self.leaves[li + 1]]
        torch.autograd.backward(self.outs[li], grad_tensors=grads)
        self.outs[li] = []
        self.kv[li] = []
        self.leaves[li + 1] = []
