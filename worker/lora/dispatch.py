"""Picks the batched-LoRA implementation by device: Triton kernels on CUDA, the torch reference elsewhere.

Why lazily: `triton_ops.py` imports triton, which does not exist on CPU-only machines; it is imported the first
time a CUDA tensor needs it. If it cannot be imported the torch path runs (correct, slower) and says so once.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch
from lorafleet.worker.lora import ops as torch_ops

log = logging.getLogger(__name__)
_triton: ModuleType | None = None
_triton_failed = False


def ops_for(device: torch.device) -> ModuleType:
    global _triton, _triton_failed
    if device.type != "cuda" or _triton_failed:
        return torch_ops
    if _triton is None:
        try:
            from lorafleet.worker.lora import triton_ops

            _triton = triton_ops
        except Exception as exc:  # noqa: BLE001 - any import failure means "use the reference path"
            _triton_failed = True
            log.warning("Triton LoRA kernels unavailable (%s); using the torch reference path", exc)
            return torch_ops
    return _triton


def lora_shrink(x, lora_a, seg_indptr, seg_slots, out=None):
    return ops_for(x.device).lora_shrink(x, lora_a, seg_indptr, seg_slots, out)


def lora_expand(v, lora_b, seg_indptr, seg_slots, scales, y):
    return ops_for(y.device).lora_expand(v, lora_b, seg_indptr, seg_slots, scales, y)
