"""Sharded layers, and `shard_llama`: a loaded `LlamaForCausalLM` becomes one tensor-parallel rank's shard in place.

Why in place over the ordinary model: loading, the attention contexts, rotary, norms and the LoRA contexts stay
the single-GPU code. Only the seven projections, the embedding and the head change class; each keeps the module
name HF checkpoints use, so a rank loads the whole checkpoint once and slices it (`plan.py` says which slice).
Communication per layer is the two all-reduces of the row-parallel outputs (o, down); LoRA adds one collective of
the rank-r intermediate per projection (`lora.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lorafleet.worker.layers.linear import LoRAContext, LoRALinear
from lorafleet.worker.models.llama import LlamaForCausalLM
from lorafleet.worker.parallel.group import TPGroup
from lorafleet.worker.parallel.plan import COLUMN, ROW, ShardPlan
from torch import nn


def _no_frozen_base(lora: LoRAContext | None) -> None:
    # the fused co-serving ride replays layers from serving's own base products; those are per-rank partial sums here
    if getattr(lora, "base", None) is not None:
        raise NotImplementedError("a LoRA context that supplies base products is not supported with tensor parallel")


class ColumnParallelLoRALinear(LoRALinear):
    """Holds output rows [lo, hi) of the projection; the input is replicated, the output stays sharded."""

    def __init__(self, full: LoRALinear, lo: int, hi: int, group: TPGroup) -> None:
        super().__init__(full.in_features, hi - lo, full.bias is not None, full.layer_idx, full.proj)
        self.group = group
        self.weight = nn.Parameter(full.weight.data[lo:hi].clone(), requires_grad=False)
        if full.bias is not None:
            self.bias = nn.Parameter(full.bias.data[lo:hi].clone(), requires_grad=False)

    def forward(self, x: torch.Tensor, lora: LoRAContext | None = None) -> torch.Tensor:
        _no_frozen_base(lora)
        x = self.group.copy(x)
        y = F.linear(x, self.weight, self.bias)
        return y if lora is None else lora.apply(self.layer_idx, self.proj, x, y)


class RowParallelLoRALinear(LoRALinear):
    """Holds input columns [lo, hi); the ranks' partial outputs (LoRA delta included) are summed, then the bias."""

    def __init__(self, full: LoRALinear, lo: int, hi: int, group: TPGroup) -> None:
        super().__init__(hi - lo, full.out_features, full.bias is not None, full.layer_idx, full.proj)
        self.group = group
        self.weight = nn.Parameter(full.weight.data[:, lo:hi].clone(), requires_grad=False)
        if full.bias is not None:
            self.bias = nn.Parameter(full.bias.data.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor, lora: LoRAContext | None = None) -> torch.Tensor:
        _no_frozen_base(lora)
        y = F.linear(x, self.weight)
        if lora is not None:
            y = lora.apply(self.layer_idx, self.proj, x, y)
        y = self.group.reduce(y)
        return y if self.bias is None else y + self.bias


def vocab_block(weight: torch.Tensor, plan: ShardPlan) -> nn.Parameter:
    """Rows [lo, hi) of a [vocab, hidden] weight; rows past the real vocabulary (padding) are zero."""
    lo, hi = plan.vocab()
    w = weight.data.new_zeros(hi - lo, weight.shape[1])
    real = max(0, min(hi, weight.shape[0]) - lo)
    w[:real] = weight.data[lo : lo + real]
    return nn.Parameter(w, requires_grad=False)


class VocabParallelEmbedding(nn.Module):
    """Rows [lo, hi) of the padded vocabulary; ids outside the block contribute zeros to the all-reduce."""

    def __init__(self, full: nn.Embedding, plan: ShardPlan, group: TPGroup) -> None:
        super().__init__()
        self.group = group
        self.lo, self.hi = plan.vocab()
        self.weight = vocab_block(full.weight, plan)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.lo) & (ids < self.hi)
        local = torch.where(inside, ids - self.lo, torch.zeros_like(ids))
        out = F.embedding(local, self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        return self.group.reduce(out)


class VocabParallelHead(nn.Module):
    """Logits of this rank's vocabulary block, gathered into the full (unpadded) vocabulary on every rank."""

    def __init__(self, weight: nn.Parameter, vocab_size: int, group: TPGroup) -> None:
        super().__init__()
        self.group = group
        self.vocab_size = vocab_size
        self.weight = weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = F.linear(self.group.copy(h), self.weight)
        return self.group.gather(local, -1)[..., : self.vocab_size]


def shard_llama(model: LlamaForCausalLM, group: TPGroup) -> ShardPlan:
    """Turns `model` (whole weights loaded) into rank `group.rank`'s shard; returns the plan it used.

    Afterwards `model.shape` is the rank's local shape (so the KV cache holds only its heads) and `model.full_shape`
    the whole model's (adapters are read and validated against it, then sharded by `lora.py`).
    """
    if getattr(model, "full_shape", None) is not None:
        raise ValueError("model is already sharded")
    plan = ShardPlan(model.shape, group.rank, group.world)
    local = plan.local_shape()
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.fused is not None or mlp.fused is not None:
            raise ValueError("shard the model before fuse_projections")
        for mod in (attn, mlp):
            for proj in (*COLUMN, *ROW):
                full = getattr(mod, proj, None)
                if full is None:
                    continue
                if proj in COLUMN:
                    lo, hi = plan.rows(proj)
                    setattr(mod, proj, ColumnParallelLoRALinear(full, lo, hi, group))
                else:
                    lo, hi = plan.cols(proj)
                    setattr(mod, proj, RowParallelLoRALinear(full, lo, hi, group))
        attn.s = local
    embed = VocabParallelEmbedding(model.model.embed_tokens, plan, group)
    if model.shape.tie_word_embeddings:
        head_w = embed.weight
    else:
        head_w = vocab_block(model.lm_head.weight, plan)
    model.model.embed_tokens = embed
    model.lm_head = VocabParallelHead(head_w, model.shape.vocab_size, group)
    model.full_shape = model.shape
    model.shape = local
    model.tp_plan = plan
    return plan
