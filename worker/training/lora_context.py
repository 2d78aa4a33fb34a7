"""The trainable LoRA of one adapter: fp32 master weights, compute-dtype forward, and its dense context.

Why separate masters: AdamW state and the weights live in fp32 so small updates are not rounded away, while the
forward on GPU runs the LoRA matmuls in the model's compute dtype (bf16); the casts are differentiable, so the
gradients land on the fp32 masters. On CPU the compute dtype is fp32 and everything is exact.
"""

from __future__ import annotations

import math

import torch
from lorafleet.worker.models.llama import ModelShape
from torch import nn


class TrainableLoRA(nn.Module):
    """A[r, in] / B[out, r] per (layer, projection) as fp32 parameters; a fresh adapter has B = 0 (equals base)."""

    def __init__(
        self,
        shape: ModelShape,
        rank: int,
        alpha: float,
        targets: list[str],
        use_rslora: bool = False,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.rank = rank
        self.alpha = float(alpha)
        self.targets = list(targets)
        self.use_rslora = use_rslora
        self.num_layers = shape.num_layers
        self.scale = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        gen = torch.Generator().manual_seed(seed)
        for layer in range(shape.num_layers):
            for proj in self.targets:
                fin, fout = shape.proj_dims(proj)
                a = torch.empty(rank, fin)
                bound = 1.0 / math.sqrt(fin)  # kaiming_uniform(a=sqrt(5)) bound, as peft initialises lora_A
                a.uniform_(-bound, bound, generator=gen)
                self.a[self._k(layer, proj)] = nn.Parameter(a.to(device))
                self.b[self._k(layer, proj)] = nn.Parameter(torch.zeros(fout, rank, device=device))

    @staticmethod
    def _k(layer: int, proj: str) -> str:
        return f"{layer}_{proj}"

    def pair(self, layer: int, proj: str) -> tuple[nn.Parameter, nn.Parameter] | None:
        k = self._k(layer, proj)
        if k not in self.a:
            return None
        return self.a[k], self.b[k]

    def load_weights(self, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
        with torch.no_grad():
            for (layer, proj), (a, b) in weights.items():
                p = self.pair(layer, proj)
                if p is None:
                    raise ValueError(f"adapter has weights for untrained target {proj} of layer {layer}")
                p[0].copy_(a.float())
                p[1].copy_(b.float())

    def pairs(self) -> list[tuple[tuple[int, str], tuple[nn.Parameter, nn.Parameter]]]:
        """((layer, proj), (A, B)) of every trained projection, layer by layer."""
        return [
            ((i, p), (self.a[self._k(i, p)], self.b[self._k(i, p)]))
            for i in range(self.num_layers)
            for p in self.targets
        ]

    def export(self) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """Detached fp32 copies on CPU, in the (layer, proj) -> (A, B) form of `versions.save_peft_adapter`."""
        return {k: (a.detach().float().cpu().clone(), b.detach().float().cpu().clone()) for k, (a, b) in self.pairs()}

    def finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.parameters())

    @classmethod
    def from_peft(cls, shape: ModelShape, path, device: torch.device | str = "cpu") -> TrainableLoRA:
        from lorafleet.worker.training.versions import load_peft_adapter

        cfg, weights = load_peft_adapter(path)
        targets = sorted({p for _, p in weights})
        t = cls(shape, int(cfg["r"]), float(cfg["lora_alpha"]), targets, bool(cfg.get("use_rslora", False)), device)
        t.load_weights(weights)
        return t


class TrainLoRAContext:
    """`lora.apply` for training: y + scale · (x·Aᵀ)·Bᵀ with A/B cast to the compute dtype (grads reach fp32)."""

    def __init__(self, lora: TrainableLoRA, compute_dtype: torch.dtype) -> None:
        self.lora = lora
        self.dtype = compute_dtype

    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.lora.pair(layer_idx, proj)
        if p is None:
            return y
        a, b = p
        xa = x.to(self.dtype) @ a.to(self.dtype).t()  # FlexLLM: x and x·Aᵀ are what autograd keeps here
        return y + ((xa @ b.to(self.dtype).t()) * self.lora.scale).to(y.dtype)
