"""LoRA-only training in the engine's own model: fp32 masters + AdamW, compute-dtype forward, grad accumulation,
loss masked to the completion tokens, optional reuse of a stashed prompt state.

Why the engine's model: co-serving trains on the very weights that serve (no second copy of the base), through
the same `LoRAContext` hook the serving path uses. The base is frozen (`requires_grad=False` everywhere), so
autograd keeps only what the LoRA gradients need.

Loss normalisation: an optimizer step's loss is Σ_samples Σ_completion-tokens w·CE / (number of completion tokens
in the step), i.e. the token mean peft/transformers computes with labels = -100 on the prompt, so gradients are
directly comparable (a test checks equality with transformers+peft).

A sample with `prefix_kv` (K/V of `prompt[:-1]` per layer, from the activation stash or recomputed under no-grad)
is trained by forwarding only `[prompt[-1]] + completion[:-1]` against that prefix: the prompt K/V are constants
(see `stash.py` for exactly what that cuts from full backprop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lorafleet.worker.layers.attention import DenseAttentionContext
from lorafleet.worker.models.llama import LlamaForCausalLM
from lorafleet.worker.training.attention import PackedPrefixAttention
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


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_accumulation: int = 4
    max_grad_norm: float | None = 1.0
    micro_batch_tokens: int = 512


@dataclass
class StepResult:
    step: int
    loss: float
    tokens: int
    grad_norm: float
    extras: dict = field(default_factory=dict)


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
    def sequence_inputs(self, s: TrainSample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PrefixKV | None]:
        """(input ids, positions, targets with -100 on non-loss rows, prefix) of one sample."""
        p, c = s.prompt_ids, s.completion_ids
        if not p or not c:
            raise ValueError("a training sample needs a non-empty prompt and completion")
        if s.prefix_kv is not None:
            ids = [p[-1], *c[:-1]]
            start = len(p) - 1
            targets = list(c)
        else:
            ids = [*p, *c[:-1]]
            start = 0
            targets = [-100] * (len(p) - 1) + list(c)
        dev = self.device
        return (
            torch.tensor(ids, device=dev),
            torch.arange(start, start + len(ids), device=dev),
            torch.tensor(targets, device=dev),
            s.prefix_kv,
        )

    def loss_sum(self, s: TrainSample) -> torch.Tensor:
        """Σ w·CE over the sample's completion tokens (fp32), with autograd into the LoRA masters."""
        ids, pos, targets, prefix = self.sequence_inputs(s)
        if prefix is not None and prefix[0][0].shape[0] == 0:
            prefix = None
        attn = DenseAttentionContext(
            self.model.attn_scale, prefix_kv=prefix, sliding_window=self.model.shape.sliding_window
        )
        h = self.model(ids, pos, attn, self.ctx)
        rows = targets >= 0
        logits = self.model.compute_logits(h[rows])
        return F.cross_entropy(logits, targets[rows], reduction="sum") * s.weight

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

    def packed_loss_sums(self, samples: list[TrainSample]) -> torch.Tensor:
        """Per-sample Σ w·CE of several samples in ONE forward (packed tokens, per-sample prefixes); shape [n]."""
        parts = [self.sequence_inputs(s) for s in samples]
        ids = torch.cat([p[0] for p in parts])
        pos = torch.cat([p[1] for p in parts])
        targets = torch.cat([p[2] for p in parts])
        prefixes = [p[3] if p[3] is not None and p[3][0][0].shape[0] > 0 else None for p in parts]
        lens = [int(p[0].shape[0]) for p in parts]
        attn = PackedPrefixAttention(
            self.model.attn_scale, lens, prefixes, self.device, sliding_window=self.model.shape.sliding_window
        )
        h = self.model(ids, pos, attn, self.ctx)
        rows = targets >= 0
        tok = F.cross_entropy(self.model.compute_logits(h[rows]), targets[rows], reduction="none")
        owner = torch.repeat_interleave(
            torch.arange(len(samples), device=self.device), torch.tensor(lens, device=self.device)
        )[rows]
        weights = torch.tensor([s.weight for s in samples], device=self.device, dtype=tok.dtype)
        return torch.zeros(len(samples), device=self.device, dtype=tok.dtype).index_add(0, owner, tok) * weights

    # ---- optimisation ----
    def accumulate(self, samples: list[TrainSample], denom: int) -> float:
        """Backward of the samples' loss / denom (gradients add up); returns the summed (unnormalised) loss.
        Samples are packed into micro-batches of at most `micro_batch_tokens` tokens, one forward each."""
        total = 0.0
        batch: list[TrainSample] = []
        size = 0
        cap = self.cfg.micro_batch_tokens

        def flush() -> float:
            if not batch:
                return 0.0
            loss = self.packed_loss_sums(batch).sum()
            (loss / denom).backward()
            return float(loss.detach())

        for s in samples:
            n = len(s.completion_ids) + (1 if s.prefix_kv is not None else len(s.prompt_ids))
            if batch and size + n > cap:
                total += flush()
                batch, size = [], 0
            batch.append(s)
            size += n
        total += flush()
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
        out = {}
        for layer in range(self.lora.num_layers):
            for proj in self.lora.targets:
                a, b = self.lora.pair(layer, proj)  # type: ignore[misc]
                out[(layer, proj)] = (
                    a.grad.detach().clone() if a.grad is not None else torch.zeros_like(a),
                    b.grad.detach().clone() if b.grad is not None else torch.zeros_like(b),
                )
        return out
