"""The batched-LoRA kernel contract (Punica SGMV / vLLM shrink-expand), with the reference torch path.

Why this shape: the batch is laid out with the tokens of each adapter contiguous ("sorted tokens"), described by
segment offsets `seg_indptr[0..G]` and the GPU slot of each segment `seg_slots[0..G-1]` (-1 = no adapter). Every
projection then does a *shrink* `v = x · Aᵀ` into a small fp32 buffer and an *expand* `y += (v · Bᵀ) · scale`,
so the base GEMM stays one dense matmul over the whole batch and the LoRA work is proportional to rank.

Slots are padded to the store's max rank with zeros, so adapters of different ranks share one stacked tensor:
    lora_a: [num_slots, max_rank, in_features]
    lora_b: [num_slots, out_features, max_rank]
    scales: [num_slots] float32 (alpha / r, or alpha / sqrt(r) for rsLoRA)
The Triton kernels in `triton_ops.py` implement the same two functions with the same arguments; `dispatch.py`
picks one by device. Tests run both against this file.
"""

from __future__ import annotations

import torch


def lora_shrink(
    x: torch.Tensor,  # [T, in_features], tokens sorted by segment
    lora_a: torch.Tensor,  # [S, R, in_features]
    seg_indptr: torch.Tensor,  # [G+1] int32/int64, seg_indptr[0] = 0, seg_indptr[G] = T
    seg_slots: torch.Tensor,  # [G] int32/int64, slot per segment, -1 = no adapter
    out: torch.Tensor | None = None,  # [T, R] float32
) -> torch.Tensor:
    """v[t] = x[t] · A[slot(t)]ᵀ, in fp32; rows of segments without adapter are zero."""
    t = x.shape[0]
    r = lora_a.shape[1]
    if out is None:
        out = torch.zeros(t, r, dtype=torch.float32, device=x.device)
    else:
        out.zero_()
    bounds = seg_indptr.tolist()
    for g, slot in enumerate(seg_slots.tolist()):
        lo, hi = bounds[g], bounds[g + 1]
        if slot < 0 or hi <= lo:
            continue
        out[lo:hi] = (x[lo:hi] @ lora_a[slot].t()).float()
    return out


def lora_expand(
    v: torch.Tensor,  # [T, R] float32 from lora_shrink
    lora_b: torch.Tensor,  # [S, out_features, R]
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    scales: torch.Tensor,  # [S] float32
    y: torch.Tensor,  # [T, out_features], updated in place: y += scale * v · Bᵀ
) -> torch.Tensor:
    bounds = seg_indptr.tolist()
    for g, slot in enumerate(seg_slots.tolist()):
        lo, hi = bounds[g], bounds[g + 1]
        if slot < 0 or hi <= lo:
            continue
        delta = (v[lo:hi] @ lora_b[slot].t().float()) * scales[slot]
        y[lo:hi] += delta.to(y.dtype)
    return y
