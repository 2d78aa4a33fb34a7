"""Rotary position embedding with the config's rope scaling, as a precomputed cos/sin table indexed by position.

Why a table: positions of a mixed batch (prefill chunks + decodes) are arbitrary, so the table is gathered by the
flat `positions` tensor. default / linear / llama3 are computed here; yarn and longrope reuse transformers' init
functions (static scaling at init). "dynamic" NTK is only exact up to the original context length (HF rescales
beyond it per call), so it is refused rather than silently diverging.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_parameters(hf_config) -> dict:
    """Normalises transformers 4 (`rope_scaling` + `rope_theta`) and 5 (`rope_parameters`) config layouts."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling and not params.get("rope_type"):
        params.update(scaling)
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def compute_inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    p = rope_parameters(hf_config)
    rope_type = p["rope_type"]
    dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
    if dim != head_dim:
        raise ValueError("partial rotary embeddings are not supported")
    inv_freq = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / p["factor"], 1.0
    if rope_type == "llama3":
        factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > lo_wl, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wl) * ~(wavelen > lo_wl)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope_type in ("yarn", "longrope"):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv, scale = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
        return inv.float(), float(scale)
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config, head_dim: int, max_positions: int) -> None:
        super().__init__()
        with torch.device("cpu"):  # exact fp32 tables even when the model is built on the meta device
            inv_freq, scale = compute_inv_freq(hf_config, head_dim)
            t = torch.arange(max_positions, dtype=torch.float32)
            freqs = t[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)
        self.kernel = None  # triton_elementwise.rotary when switched on (gradient-free GPU forwards)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hk, D]; cos/sin are cast to q's dtype first, as HF does."""
        if self.kernel is not None and not torch.is_grad_enabled() and q.stride(2) == 1 and k.stride(2) == 1:
            return self.kernel(positions, q, k, self.cos, self.sin)
        cos = self.cos[positions].to(q.dtype).unsqueeze(1)
        sin = self.sin[positions].to(q.dtype).unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
