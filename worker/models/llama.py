"""Compact Llama-family forward over a flat token batch (no padding), with pluggable attention and LoRA contexts.

Covers Llama 2/3 (rope scaling), Mistral (sliding window), Qwen2 (q/k/v bias) and SmolLM2 (tied embeddings),
with GQA. Module names equal HF's so checkpoints load by name. Base weights are frozen; LoRA deltas come from the
`lora` context so the same code serves mixed-adapter batches and trains one adapter with autograd.
`capture(layer, site, tensor)` exposes LoRA inputs, K/V and the residual stream (each layer's input, the final
norm's input) to activation recording and to fused co-serving (training/fused.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lorafleet.worker.layers.activation import check_activation, silu_and_mul
from lorafleet.worker.layers.attention import AttentionContext
from lorafleet.worker.layers.linear import LoRAContext, LoRALinear, merged_weight
from lorafleet.worker.layers.rmsnorm import RMSNorm
from lorafleet.worker.layers.rotary import RotaryEmbedding
from torch import nn

Capture = Callable[[int, str, torch.Tensor], None]
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
PROJ_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions the rest of the engine (KV cache, adapter store, validation) needs."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None
    rms_norm_eps: float

    @classmethod
    def from_hf(cls, cfg) -> ModelShape:
        model_type = getattr(cfg, "model_type", "llama")
        if model_type not in SUPPORTED_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {SUPPORTED_TYPES}")
        check_activation(getattr(cfg, "hidden_act", "silu"))
        heads = cfg.num_attention_heads
        attn_bias = bool(getattr(cfg, "attention_bias", False))
        sliding = getattr(cfg, "sliding_window", None)
        if model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
            sliding = None
        return cls(
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            vocab_size=cfg.vocab_size,
            qkv_bias=attn_bias or model_type == "qwen2",
            o_bias=attn_bias,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            sliding_window=sliding,
            rms_norm_eps=getattr(cfg, "rms_norm_eps", 1e-6),
        )

    def proj_dims(self, proj: str) -> tuple[int, int]:
        """(in_features, out_features) of a LoRA target projection."""
        h, q, kv, i = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[proj]


class FusedLinear:
    """One GEMM for projections that share their input (q|k|v, gate|up); the member LoRALinear modules keep views
    into the fused weight, so names, loading and training code see the usual per-projection parameters.

    LoRA: a context with `apply_group` (serving segments) adds all deltas with one shrink + one expand; any other
    context (e.g. dense training) gets one `apply` per projection slice.
    """

    def __init__(self, members: tuple[LoRALinear, ...]) -> None:
        self.weight = torch.cat([m.weight.data for m in members], 0)
        biases = [m.bias for m in members]
        self.bias = torch.cat([b.data for b in biases], 0) if all(b is not None for b in biases) else None
        if any(b is not None for b in biases) and self.bias is None:
            raise ValueError("cannot fuse projections where only some have a bias")
        lo = 0
        self.sizes = []
        for m in members:
            n = m.out_features
            m.weight = nn.Parameter(self.weight[lo : lo + n], requires_grad=False)
            if self.bias is not None:
                m.bias = nn.Parameter(self.bias[lo : lo + n], requires_grad=False)
            self.sizes.append(n)
            lo += n

    def __call__(self, x, lora, group: str, members: tuple[LoRALinear, ...]) -> tuple[torch.Tensor, ...]:
        y = F.linear(x, merged_weight(lora, members[0].layer_idx, group, self.weight), self.bias)
        if lora is not None and hasattr(lora, "apply_group"):
            y = lora.apply_group(members[0].layer_idx, group, x, y)
            return tuple(y.split(self.sizes, dim=-1))
        parts = y.split(self.sizes, dim=-1)
        if lora is None:
            return tuple(parts)
        return tuple(lora.apply(m.layer_idx, m.proj, x, p) for m, p in zip(members, parts, strict=True))


class Attention(nn.Module):
    def __init__(self, s: ModelShape, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.s = s
        self.rotary = rotary
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            fin, fout = s.proj_dims(proj)
            bias = s.o_bias if proj == "o_proj" else s.qkv_bias
            setattr(self, proj, LoRALinear(fin, fout, bias, layer_idx, proj))

        self.fused: FusedLinear | None = None  # set by LlamaForCausalLM.fuse_projections (GPU serving)

    def _qkv(self, x, lora: LoRAContext | None):
        if self.fused is None:
            return self.q_proj(x, lora), self.k_proj(x, lora), self.v_proj(x, lora)
        return self.fused(x, lora, "qkv", (self.q_proj, self.k_proj, self.v_proj))

    def forward(self, x, positions, attn: AttentionContext, lora: LoRAContext | None, capture: Capture | None):
        s, li = self.s, self.layer_idx
        if capture is not None:
            capture(li, "attn_in", x)
        q, k, v = self._qkv(x, lora)
        q = q.reshape(-1, s.num_heads, s.head_dim)
        k = k.reshape(-1, s.num_kv_heads, s.head_dim)
        v = v.reshape(-1, s.num_kv_heads, s.head_dim)
        q, k = self.rotary(positions, q, k)
        if capture is not None:
            capture(li, "k", k)
            capture(li, "v", v)
        o = attn.attend(li, q, k, v).reshape(-1, s.num_heads * s.head_dim)
        if capture is not None:
            capture(li, "o_in", o)
        return self.o_proj(o, lora)


class MLP(nn.Module):
    def __init__(self, s: ModelShape, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        for proj in ("gate_proj", "up_proj", "down_proj"):
            fin, fout = s.proj_dims(proj)
            setattr(self, proj, LoRALinear(fin, fout, s.mlp_bias, layer_idx, proj))

        self.fused: FusedLinear | None = None
        self.act_kernel = None  # triton_elementwise.silu_and_mul when switched on

    def forward(self, x, lora: LoRAContext | None, capture: Capture | None):
        if capture is not None:
            capture(self.layer_idx, "mlp_in", x)
        if self.fused is None:
            gate, up = self.gate_proj(x, lora), self.up_proj(x, lora)
        else:
            gate, up = self.fused(x, lora, "gate_up", (self.gate_proj, self.up_proj))
        kernel = self.act_kernel if self.act_kernel is not None and not torch.is_grad_enabled() else silu_and_mul
        h = kernel(gate, up)
        if capture is not None:
            capture(self.layer_idx, "down_in", h)
        return self.down_proj(h, lora)


class DecoderLayer(nn.Module):
    def __init__(self, s: ModelShape, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Attention(s, layer_idx, rotary)
        self.mlp = MLP(s, layer_idx)
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)

    def forward(self, h, positions, attn, lora, capture, delta=None, defer_residual: bool = False):
        """`delta`: the previous layer's output not yet added to `h`; the add runs inside this layer's input norm.
        `defer_residual`: return `(h, mlp_out)` instead of `h + mlp_out`, so the next norm fuses that add too.
        Either way the sums are the bf16 additions HF makes (addition commutes, so the bits are the same)."""
        if delta is None:
            x = self.input_layernorm(h)
        else:
            x, h = self.input_layernorm(delta, residual=h)
        if capture is not None:
            capture(self.self_attn.layer_idx, "layer_in", h)
        x, h = self.post_attention_layernorm(self.self_attn(x, positions, attn, lora, capture), residual=h)
        out = self.mlp(x, lora, capture)
        return (h, out) if defer_residual else h + out


class LlamaModel(nn.Module):
    def __init__(self, s: ModelShape, hf_config, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        rotary = RotaryEmbedding(hf_config, s.head_dim, max_positions)
        self.layers = nn.ModuleList(DecoderLayer(s, i, rotary) for i in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.rotary = rotary  # shared by every layer; registered once here


class LlamaForCausalLM(nn.Module):
    def __init__(self, hf_config, max_positions: int | None = None) -> None:
        super().__init__()
        self.shape = ModelShape.from_hf(hf_config)
        s = self.shape
        max_positions = max_positions or getattr(hf_config, "max_position_embeddings", 4096)
        self.model = LlamaModel(s, hf_config, max_positions)
        self.lm_head = nn.Linear(s.hidden_size, s.vocab_size, bias=False)
        if s.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.requires_grad_(False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        attn: AttentionContext,
        lora: LoRAContext | None = None,
        capture: Capture | None = None,
    ) -> torch.Tensor:
        """Returns the final-norm hidden states [T, H]; call `compute_logits` on the rows that need sampling."""
        h = self.model.embed_tokens(input_ids)
        delta = None
        for layer in self.model.layers:
            h, delta = layer(h, positions, attn, lora, capture, delta=delta, defer_residual=True)
        x, h = self.model.norm(delta, residual=h)
        if capture is not None:
            capture(len(self.model.layers), "final_in", h)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def fuse_projections(self) -> None:
        """Serve q|k|v and gate|up as one GEMM each (fewer, larger kernels on GPU); weights become views."""
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            a.fused = FusedLinear((a.q_proj, a.k_proj, a.v_proj))
            m.fused = FusedLinear((m.gate_proj, m.up_proj))

    def use_triton_elementwise(self, on: bool = True) -> None:
        """Gradient-free forwards run RMSNorm (+ residual add), rotary and SiLU-and-mul as one Triton kernel each
        (layers/triton_elementwise.py); autograd forwards (training, fused replays) keep the torch layers."""
        tri = None
        if on:
            from lorafleet.worker.layers import triton_elementwise as tri
        for mod in self.modules():
            if isinstance(mod, RMSNorm):
                mod.kernel = tri.rms_norm if tri else None
            elif isinstance(mod, RotaryEmbedding):
                mod.kernel = tri.rotary if tri else None
            elif isinstance(mod, MLP):
                mod.act_kernel = tri.silu_and_mul if tri else None

    @property
    def attn_scale(self) -> float:
        return self.shape.head_dim**-0.5
