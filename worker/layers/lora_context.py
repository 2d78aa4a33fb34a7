"""The two LoRA contexts: segments over stacked GPU slots (serving) and one dense adapter (training).

Serving (Punica/S-LoRA, REFERENCES §1): tokens of one adapter are contiguous; `seg_indptr`/`seg_slots` describe
the segments and each projection does shrink (x·Aᵀ, fp32) then expand (y += s·v·Bᵀ) over the slot tensors the
adapter store keeps padded to max rank. Training: a dense `(A, B)` per (layer, projection), autograd-friendly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

MAX_FUSED_SHRINK_RANK = 128  # stacked rank (slices x max_rank) up to which a group uses one shrink launch


class SlotWeights(Protocol):
    """What the adapter store exposes to the model: stacked, padded slot tensors per (layer, projection)."""

    scales: torch.Tensor  # [S] float32

    def stacked(self, layer_idx: int, proj: str, always: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None: ...

    def stacked_group(
        self, layer_idx: int, group: str, always: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]] | None: ...


class SegmentLoRAContext:
    def __init__(
        self, slots: SlotWeights, seg_indptr: torch.Tensor, seg_slots: torch.Tensor, always: bool = False
    ) -> None:
        """`always`: apply every projection even if no resident adapter targets it (CUDA graphs bake the choice in)."""
        from lorafleet.worker.lora import dispatch

        self.always = always
        self.slots = slots
        self.seg_indptr = seg_indptr
        self.seg_slots = seg_slots
        self._ops = dispatch.ops_for(seg_indptr.device)
        self._buf: torch.Tensor | None = None

    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = self.slots.stacked(layer_idx, proj, self.always)
        if w is None:
            return y
        lora_a, lora_b = w
        v = self._ops.lora_shrink(x, lora_a, self.seg_indptr, self.seg_slots)
        self._ops.lora_expand(v, lora_b, self.seg_indptr, self.seg_slots, self.slots.scales, y)
        return y

    def apply_group(self, layer_idx: int, group: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """For a fused base projection (qkv, gate_up): one shrink over the stacked A's, one multi-slice expand
        into the column ranges of y (the Triton path does it in one launch; the torch path slice by slice)."""
        w = self.slots.stacked_group(layer_idx, group, self.always)
        if w is None:
            return y
        lora_a, lora_b, bounds = w
        r = lora_b.shape[2]
        if lora_a.shape[1] <= MAX_FUSED_SHRINK_RANK:
            v = self._ops.lora_shrink(x, lora_a, self.seg_indptr, self.seg_slots)
        else:  # a wide stacked rank would not fit the shrink kernel's tile: one shrink per slice, same buffer
            v = torch.empty(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
            for i in range(len(bounds) - 1):
                sl = slice(i * r, (i + 1) * r)
                self._ops.lora_shrink(x, lora_a[:, sl], self.seg_indptr, self.seg_slots, out=v[:, sl])
        expand_slices = getattr(self._ops, "lora_expand_slices", None)
        if expand_slices is not None and len(bounds) <= 4:
            expand_slices(v, lora_b, self.seg_indptr, self.seg_slots, self.slots.scales, y, bounds)
            return y
        for i in range(len(bounds) - 1):
            lo, hi = bounds[i], bounds[i + 1]
            self._ops.lora_expand(
                v[:, i * r : (i + 1) * r],
                lora_b[:, lo:hi],
                self.seg_indptr,
                self.seg_slots,
                self.slots.scales,
                y[:, lo:hi],
            )
        return y


class DenseLoRAContext:
    """One adapter for every token: y + scale * (x·Aᵀ)·Bᵀ, computed in fp32 so A/B may be trainable fp32 params."""

    def __init__(self, weights: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], scale: float) -> None:
        self.weights = weights
        self.scale = scale

    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = self.weights.get((layer_idx, proj))
        if w is None:
            return y
        a, b = w
        delta = (x.to(a.dtype) @ a.t()) @ b.t().to(a.dtype)
        return y + (delta * self.scale).to(y.dtype)
