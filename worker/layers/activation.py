"""SwiGLU: the Llama-family MLP nonlinearity (silu(gate) * up)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def check_activation(name: str) -> None:
    """Every supported family uses silu; refuse others loudly instead of computing a different model."""
    if name not in ("silu", "swish"):
        raise ValueError(f"unsupported hidden_act {name!r} (only silu/SwiGLU models are supported)")
