"""Frozen base linear plus an optional LoRA delta supplied by a pluggable context.

Why a context instead of LoRA weights inside the module: serving mixes many adapters in one batch (segment
context over the store's stacked slots), training uses one adapter's trainable fp32 parameters (dense context),
and the module must not care which. It only calls `lora.apply(layer_idx, proj_name, x, y)`, and reads its base
weight through `merged_weight`, which a merged serving step points at a copy with one adapter folded in.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class LoRAContext(Protocol):
    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Returns y + LoRA delta for the tokens in x (may update y in place when no grad is needed)."""
        ...


def merged_weight(lora: object | None, layer_idx: int, name: str, base: torch.Tensor) -> torch.Tensor:
    """The weight a base GEMM reads: `base`, or the merged copy a merged step's context holds (lora/merged.py)."""
    get = getattr(lora, "merged_weight", None)
    return base if get is None else get(layer_idx, name, base)


class LoRALinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, layer_idx: int, proj: str) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.layer_idx = layer_idx
        self.proj = proj
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, lora: LoRAContext | None = None) -> torch.Tensor:
        y = F.linear(x, merged_weight(lora, self.layer_idx, self.proj, self.weight), self.bias)
        if lora is not None:
            y = lora.apply(self.layer_idx, self.proj, x, y)
        return y
