"""RMSNorm computed in fp32 and cast back, in exactly HF's order so bf16 logits match the reference bit for bit.

`residual`: the caller's residual add fused in front (`h = x + residual`, then the norm of h), so a GPU step runs
both as one Triton kernel (`triton_elementwise.rms_norm`, switched on by `LlamaForCausalLM.use_triton_elementwise`
for gradient-free forwards); the torch path does the same two bf16 operations HF does.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.kernel = None  # triton_elementwise.rms_norm when switched on

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Returns norm(x), or with `residual` (norm(x + residual), x + residual)."""
        if self.kernel is not None and not torch.is_grad_enabled() and x.dim() == 2 and x.stride(1) == 1:
            # the kernel writes x's dtype; torch would promote a mixed-dtype product, so those take the torch path
            if self.weight.dtype == x.dtype and (residual is None or residual.stride(1) == 1):
                return self.kernel(x, self.weight, self.eps, residual)
        if residual is not None:
            h = x + residual
            return self._norm(h), h
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
