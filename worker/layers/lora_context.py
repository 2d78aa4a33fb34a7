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


class _ScaledSlots:
    """The adapter store's slot tensors read with other per-slot scales (the merged slot's negated scale)."""

    def __init__(self, slots: SlotWeights, scales: torch.Tensor) -> None:
        self._slots = slots
        self.scales = scales

    def stacked(self, layer_idx: int, proj: str, always: bool = False):
        return self._slots.stacked(layer_idx, proj, always)

    def stacked_group(self, layer_idx: int, group: str, always: bool = False):
        return self._slots.stacked_group(layer_idx, group, always)


class MergedLoRAContext:
    """A merged step (lora/merged.py, dLoRA): the base GEMMs read the merged copy, rows of other adapters run their
    own pass (`seg_slots` with the merged segment at -1), and every row outside the merged segment runs one pass of
    the merged slot with its negated scale (`neg_indptr` = [0, merged rows, T], `neg_slots` = [-1, merged slot]):
        x·(W + ΔW_m)ᵀ + x·ΔW_ownᵀ - x·ΔW_mᵀ = x·Wᵀ + x·ΔW_ownᵀ.
    `targets`: projections and groups the merged version adapts (None: all, as CUDA graphs need); the subtracting
    pass skips the others, whose merged buffer equals the base."""

    def __init__(
        self,
        weights: Mapping[tuple[int, str], torch.Tensor],
        slots: SlotWeights,
        neg_scales: torch.Tensor,
        seg_indptr: torch.Tensor,
        seg_slots: torch.Tensor,
        neg_indptr: torch.Tensor,
        neg_slots: torch.Tensor,
        own: bool,
        neg: bool,
        targets: frozenset[str] | None = None,
        always: bool = False,
    ) -> None:
        self.weights = weights
        self.targets = targets
        self.own = SegmentLoRAContext(slots, seg_indptr, seg_slots, always) if own else None
        self.neg = SegmentLoRAContext(_ScaledSlots(slots, neg_scales), neg_indptr, neg_slots, always) if neg else None

    def merged_weight(self, layer_idx: int, name: str, base: torch.Tensor) -> torch.Tensor:
        return self.weights.get((layer_idx, name), base)

    def _neg_for(self, name: str) -> SegmentLoRAContext | None:
        return self.neg if self.targets is None or name in self.targets else None

    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.own is not None:
            y = self.own.apply(layer_idx, proj, x, y)
        neg = self._neg_for(proj)
        return neg.apply(layer_idx, proj, x, y) if neg is not None else y

    def apply_group(self, layer_idx: int, group: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.own is not None:
            y = self.own.apply_group(layer_idx, group, x, y)
        neg = self._neg_for(group)
        return neg.apply_group(layer_idx, group, x, y) if neg is not None else y
