"""LoRA-only training in the engine's own model: fp32 masters + AdamW, compute-dtype forward, grad accumulation,
loss masked to the completion tokens, optional reuse of a stashed prompt state.

Why the engine's model: co-serving trains on the very weights that serve (no second copy of the base), through
the same `LoRAContext` hook the serving path uses. The base is frozen (`requires_grad=False` everywhere), so
autograd keeps only what the LoRA gradients need.

Loss normalisation: an optimizer step's loss is Σ_samples Σ_completion-tokens w·CE / denom. `train_step` uses the
step's completion tokens as denom, i.e. the token mean peft/transformers computes with labels = -100 on the prompt,
so gradients are directly comparable (a test checks equality with transformers+peft). A continual-learning job
divides by its feedback tokens only and weighs replay samples as a regulariser (`replay.weigh_group`), so the task
term of its steps is that same offline loss.

A sample with `prefix_kv` (K/V of `prompt[:-1]` per layer, from the activation stash or recomputed under no-grad)
is trained by forwarding only `[prompt[-1]] + completion[:-1]` against that prefix: the prompt K/V are constants
(see `stash.py` for exactly what that cuts from full backprop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lorafleet.worker.layers.attention import DenseAttentionContext
from lorafleet.worker.models.llama import LlamaForCausalLM
from lorafleet.worker.training.lora_context import TrainableLoRA, TrainLoRAContext

PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainSample:
    prompt_ids: list[int]
    completion_ids: list[int]
    weight: float = 1.0
    prefix_kv: PrefixKV | None = None  # K/V of prompt_ids[:-1] per layer; None = full forward over the prompt
    domain: str | None = None  # replay domain; None = feedback
    source: str | None = None  # feedback id / request id, for accounting

    @property
    def loss_tokens(self) -> int:
        return len(self.completion_ids)


def forward_ids(s: TrainSample) -> tuple[list[int], int, int]:
    """(the ids a sample forwards, the position of the first, the row of the first scored one): against a prefix only
    `[prompt[-1]] + completion[:-1]`, else the prompt too, its rows unscored (the eager and the packed path share it)."""
    p, c = s.prompt_ids, s.completion_ids
    if not p or not c:
        raise ValueError("a training sample needs a non-empty prompt and completion")
    return ([p[-1], *c[:-1]], len(p) - 1, 0) if s.prefix_kv is not None else ([*p, *c[:-1]], 0, len(p) - 1)


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_accumulation: int = 4
    max_grad_norm: float | None = 1.0


@dataclass
class StepResult:
    step: int
    loss: float
    tokens: int
    grad_norm: float


class LoRATrainer:
    def __init__(
        self,
        model: LlamaForCausalLM,
        lora: TrainableLoRA,
        optim: OptimConfig | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.lora = lora
        self.cfg = optim or OptimConfig()
        p0 = next(model.parameters())
        self.device = p0.device
        self.dtype = compute_dtype or p0.dtype
        self.ctx = TrainLoRAContext(lora, self.dtype)
        # fused: one kernel for all LoRA tensors, and it can skip a non-finite step on the device (`found_inf`),
        # which the asynchronous co-serving path (graphed.py) needs to never wait on the GPU
        self.fused = self.device.type in ("cuda", "cpu")
        self.opt = torch.optim.AdamW(
            lora.parameters(),
            lr=self.cfg.lr,
            betas=self.cfg.betas,
            eps=self.cfg.eps,
            weight_decay=self.cfg.weight_decay,
            fused=self.fused or None,
        )
        self.step = 0

    # ---- forward pieces ----
    def loss_sum(self, s: TrainSample, ctx=None) -> torch.Tensor:
        """Σ w·CE over the sample's completion tokens (fp32), with autograd into the LoRA masters (through `ctx`, a
        LoRA context: the trainer's own unless a test swaps in another)."""
        ids, start, skip = forward_ids(s)
        prefix = s.prefix_kv if s.prefix_kv is not None and s.prefix_kv[0][0].shape[0] > 0 else None
        attn = DenseAttentionContext(
            self.model.attn_scale, prefix_kv=prefix, sliding_window=self.model.shape.sliding_window
        )
        dev = self.device
        pos = torch.arange(start, start + len(ids), device=dev)
        h = self.model(torch.tensor(ids, device=dev), pos, attn, ctx or self.ctx)
        logits = self.model.compute_logits(h[skip:])
        return F.cross_entropy(logits, torch.tensor(s.completion_ids, device=dev), reduction="sum") * s.weight

    @torch.no_grad()
    def prompt_kv(self, prompt_ids: list[int]) -> PrefixKV:
        """Recomputes the K/V of `prompt_ids[:-1]` with the current adapter (what a stale/missing stash falls back to)."""
        n = len(prompt_ids) - 1
        layers = self.model.shape.num_layers
        if n <= 0:
            empty = torch.zeros(0, self.model.shape.num_kv_heads, self.model.shape.head_dim, device=self.device)
            return [(empty, empty)] * layers
        kv: dict[int, dict[str, torch.Tensor]] = {}

        def capture(layer: int, site: str, t: torch.Tensor) -> None:
            if site in ("k", "v"):
                kv.setdefault(layer, {})[site] = t.detach()

        ids = torch.tensor(prompt_ids[:-1], device=self.device)
        attn = DenseAttentionContext(self.model.attn_scale, sliding_window=self.model.shape.sliding_window)
        self.model(ids, torch.arange(n, device=self.device), attn, self.ctx, capture)
        return [(kv[i]["k"], kv[i]["v"]) for i in range(layers)]

    # ---- optimisation ----
    def accumulate(self, samples: list[TrainSample], denom: int) -> float:
        """Backward of the samples' loss / denom (gradients add up), one sample at a time; returns the summed
        (unnormalised) loss. The reference the jobs' packed micro-batches (graphed.py) are tested against."""
        total = 0.0
        for s in samples:
            loss = self.loss_sum(s)
            (loss / denom).backward()
            total += float(loss.detach())
        return total

    def optimizer_step(self) -> float:
        params = [p for p in self.lora.parameters() if p.grad is not None]
        if self.cfg.max_grad_norm:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        else:
            norm = float(torch.norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
        if math.isfinite(norm):
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return norm

    def train_step(self, samples: list[TrainSample]) -> StepResult:
        """One optimizer step over `samples` (the gradient-accumulation group), token-mean loss."""
        tokens = sum(s.loss_tokens for s in samples)
        loss_sum = self.accumulate(samples, max(1, tokens))
        norm = self.optimizer_step()
        return StepResult(self.step, loss_sum / max(1, tokens), tokens, norm)

    @torch.no_grad()
    def eval_loss(self, samples: list[TrainSample]) -> float:
        """Token-mean completion loss (no gradient, no optimizer state touched)."""
        tot, n = 0.0, 0
        for s in samples:
            tot += float(self.loss_sum(TrainSample(s.prompt_ids, s.completion_ids, 1.0)))
            n += s.loss_tokens
        return tot / max(1, n)

    def grads(self) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """Current gradients of the masters (for tests), (layer, proj) -> (dA, dB)."""
        g = lambda p: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)  # noqa: E731
        return {k: (g(a), g(b)) for k, (a, b) in self.lora.pairs()}
