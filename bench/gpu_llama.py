"""A compact bf16 Llama forward for the GPU benchmarks: paged KV, Triton attention, Triton SGMV LoRA, CUDA graphs.

Why it exists: the engine benchmarks need Llama-3.1-8B / Llama-3.2-1B *shapes* with random weights built straight
on the GPU (no 16 GB checkpoint), and a step whose cost is the kernels we ship (`worker/lora/triton_ops.py`,
`worker/layers/triton_attention.py`, `worker/engine/cuda_graph.py`) plus cuBLAS GEMMs, nothing else. Base GEMMs are
fused the usual way (qkv, gate|up); the LoRA of q/k/v (and gate/up) shares ONE shrink over the stacked A matrices
(`[S, 3R, in]`), then one expand per projection into its slice of the fused output: legal under the kernel
contract (v slices and y slices are strided views), and it saves the re-reads of x.
Small element-wise stages (residual add + RMSNorm, RoPE + KV-cache write, SiLU*mul) are fused Triton kernels so that
batch-1 decode stays weight-bandwidth bound rather than launch bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from lorafleet.worker.layers.triton_attention import paged_attention
from lorafleet.worker.lora.triton_ops import lora_expand_slices, lora_shrink_accumulate


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, N, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(x_ptr + row * N + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        x = x + tl.load(res_ptr + row * N + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(res_ptr + row * N + offs, x.to(res_ptr.dtype.element_ty), mask=m)
    var = tl.sum(x * x, 0) / N
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(var + eps) * w
    tl.store(out_ptr + row * N + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def add_rmsnorm(x: torch.Tensor, res: torch.Tensor | None, w: torch.Tensor, eps: float) -> torch.Tensor:
    """res += x (in place, if given); returns rmsnorm(res or x) * w."""
    t, n = x.shape
    out = torch.empty_like(x)
    _add_rmsnorm_kernel[(t,)](
        x, res if res is not None else x, w, out, n, eps, HAS_RES=res is not None, BLOCK=triton.next_power_of_2(n)
    )
    return out


@triton.jit
def _rope_cache_kernel(
    qkv_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, s_qkv, HQ, HKV, HALF: tl.constexpr
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    i = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    c = tl.load(cos_ptr + pos * HALF + i)
    s = tl.load(sin_ptr + pos * HALF + i)
    base = qkv_ptr + t * s_qkv + h * (2 * HALF)
    x1 = tl.load(base + i).to(tl.float32)
    x2 = tl.load(base + HALF + i).to(tl.float32)
    o1 = (x1 * c - x2 * s).to(qkv_ptr.dtype.element_ty)
    o2 = (x2 * c + x1 * s).to(qkv_ptr.dtype.element_ty)
    if h < HQ:
        tl.store(base + i, o1)
        tl.store(base + HALF + i, o2)
    else:
        kh = h - HQ
        slot = tl.load(slot_ptr + t).to(tl.int64)
        dst = slot * (HKV * 2 * HALF) + kh * (2 * HALF)
        tl.store(kc_ptr + dst + i, o1)
        tl.store(kc_ptr + dst + HALF + i, o2)
        vsrc = qkv_ptr + t * s_qkv + (HQ + HKV + kh) * (2 * HALF)
        tl.store(vc_ptr + dst + i, tl.load(vsrc + i))
        tl.store(vc_ptr + dst + HALF + i, tl.load(vsrc + HALF + i))


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, N, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(gu_ptr + t * 2 * N + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + t * 2 * N + N + offs, mask=m, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + t * N + offs, y.to(out_ptr.dtype.element_ty), mask=m)


@dataclass
class Shape:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    theta: float

    @staticmethod
    def from_config(cfg) -> Shape:
        return Shape(
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            cfg.vocab_size,
            bool(cfg.tie_word_embeddings),
            float(getattr(cfg, "rope_theta", None) or (cfg.rope_parameters or {}).get("rope_theta", 10000.0)),
        )


# LoRA tensors per layer: name -> (kind, rows, cols) with R the padded rank; A: [S, R*, in], B: [S, out, R].
def lora_layout(sh: Shape, r: int) -> dict[str, tuple[int, int]]:
    qd, kvd = sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim
    return {
        "a_qkv": (3 * r, sh.hidden),
        "b_qkv": (qd + 2 * kvd, r),
        "a_o": (r, qd),
        "b_o": (sh.hidden, r),
        "a_gu": (2 * r, sh.hidden),
        "b_gu": (2 * sh.inter, r),
        "a_d": (r, sh.inter),
        "b_d": (sh.hidden, r),
    }


def adapter_bytes(sh: Shape, r: int) -> int:
    return sh.layers * sum(a * b for a, b in lora_layout(sh, r).values()) * 2


class BenchLlama:
    """Random-weight bf16 Llama on the GPU with `num_slots` LoRA slots of rank `rank` and a paged KV pool."""

    def __init__(
        self,
        cfg,
        num_slots: int,
        rank: int,
        num_blocks: int,
        page: int = 16,
        max_pos: int = 8192,
        seed: int = 0,
        device: str = "cuda",
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self.sh = sh = Shape.from_config(cfg)
        self.rank, self.num_slots, self.page = rank, num_slots, page
        dev, dt = torch.device(device), dtype
        g = torch.Generator(device=dev).manual_seed(seed)
        qd, kvd = sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim

        def w(*shape: int, std: float | None = None) -> torch.Tensor:
            t = torch.empty(*shape, device=dev, dtype=dt)
            return t.normal_(0.0, std if std is not None else 1.0 / math.sqrt(shape[-1]), generator=g)

        self.embed = w(sh.vocab, sh.hidden, std=1.0)
        self.layers = []
        for _ in range(sh.layers):
            lw = {
                "ln1": torch.ones(sh.hidden, device=dev, dtype=dt),
                "ln2": torch.ones(sh.hidden, device=dev, dtype=dt),
                "qkv": w(qd + 2 * kvd, sh.hidden),
                "o": w(sh.hidden, qd),
                "gu": w(2 * sh.inter, sh.hidden),
                "d": w(sh.hidden, sh.inter),
            }
            self.layers.append(lw)
        # LoRA slots as [S, L, rows, cols] per tensor name: one adapter is 11 contiguous blocks, so loading it
        # from pinned host memory is 11 copies; each layer uses the strided view [:, layer].
        self.lora: dict[str, torch.Tensor] = {}
        if num_slots:
            for name, (rows, cols) in lora_layout(sh, rank).items():
                std = 1.0 / math.sqrt(cols) if name.startswith("a_") else 0.02
                self.lora[name] = w(num_slots, sh.layers, rows, cols, std=std)
                for li, lw in enumerate(self.layers):
                    lw[name] = self.lora[name][:, li]
        self.norm = torch.ones(sh.hidden, device=dev, dtype=dt)
        self.lm_head = self.embed if sh.tied else w(sh.vocab, sh.hidden)
        self.scales = torch.full((max(num_slots, 1),), 2.0, device=dev, dtype=torch.float32)
        inv = 1.0 / (sh.theta ** (torch.arange(0, sh.head_dim, 2, device=dev).float() / sh.head_dim))
        f = torch.arange(max_pos, device=dev).float()[:, None] * inv[None, :]
        self.cos, self.sin = f.cos().contiguous(), f.sin().contiguous()
        self.k_cache = [
            torch.empty(num_blocks, page, sh.kv_heads, sh.head_dim, device=dev, dtype=dt) for _ in range(sh.layers)
        ]
        self.v_cache = [torch.empty_like(k) for k in self.k_cache]
        for c in self.k_cache + self.v_cache:
            c.normal_(generator=g)

    def weight_bytes_per_step(self) -> int:
        """Bytes of base weights a decode step must read (everything but the embedding table, which is gathered)."""
        n = sum(lw[k].numel() for lw in self.layers for k in ("ln1", "ln2", "qkv", "o", "gu", "d"))
        return 2 * (n + self.norm.numel() + self.lm_head.numel())

    def _lora(self, x, a, b, y, v, bounds, seg_indptr, seg_slots) -> None:
        lora_shrink_accumulate(x, a, seg_indptr, seg_slots, v)
        lora_expand_slices(v, b, seg_indptr, seg_slots, self.scales, y, bounds)

    def forward(self, inp: dict[str, torch.Tensor], max_q_len: int, use_lora: bool, last_only: bool) -> torch.Tensor:
        """One step over a flat batch; returns greedy next tokens, one per sequence (last_only) or per token."""
        sh = self.sh
        qd, kvd = sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim
        ids, pos, slots = inp["input_ids"], inp["positions"], inp["slot_mapping"]
        seg_indptr, seg_slots = inp.get("seg_indptr"), inp.get("seg_slots")
        t = ids.shape[0]
        x = self.embed[ids]
        r = self.rank
        seg = (seg_indptr, seg_slots)
        # one zeroed fp32 buffer for every shrink of the step (7 rank-columns per layer: q,k,v | o | gate,up | down)
        vbuf = torch.zeros(sh.layers, t, 7 * r, device=x.device, dtype=torch.float32) if use_lora else None
        res = x
        delta = None
        for li, lw in enumerate(self.layers):
            if delta is None:
                h = add_rmsnorm(x, None, lw["ln1"], 1e-5)
                res = x.clone()
            else:
                h = add_rmsnorm(delta, res, lw["ln1"], 1e-5)
            qkv = h @ lw["qkv"].t()
            if use_lora:
                vl = vbuf[li]
                self._lora(h, lw["a_qkv"], lw["b_qkv"], qkv, vl[:, : 3 * r], (0, qd, qd + kvd, qd + 2 * kvd), *seg)
            _rope_cache_kernel[(t, sh.heads + sh.kv_heads)](
                qkv,
                pos,
                self.cos,
                self.sin,
                self.k_cache[li],
                self.v_cache[li],
                slots,
                qkv.stride(0),
                sh.heads,
                sh.kv_heads,
                HALF=sh.head_dim // 2,
            )
            q = qkv[:, :qd].view(t, sh.heads, sh.head_dim)
            attn = paged_attention(
                q,
                self.k_cache[li],
                self.v_cache[li],
                inp["block_table"],
                inp["seq_lens"],
                inp["q_indptr"],
                max_q_len,
            ).view(t, qd)
            o = attn @ lw["o"].t()
            if use_lora:
                self._lora(attn, lw["a_o"], lw["b_o"], o, vl[:, 3 * r : 4 * r], (0, sh.hidden), *seg)
            h = add_rmsnorm(o, res, lw["ln2"], 1e-5)
            gu = h @ lw["gu"].t()
            if use_lora:
                self._lora(h, lw["a_gu"], lw["b_gu"], gu, vl[:, 4 * r : 6 * r], (0, sh.inter, 2 * sh.inter), *seg)
            act = torch.empty(t, sh.inter, device=gu.device, dtype=gu.dtype)
            _silu_mul_kernel[(t, triton.cdiv(sh.inter, 1024))](gu, act, sh.inter, BLOCK=1024)
            delta = act @ lw["d"].t()
            if use_lora:
                self._lora(act, lw["a_d"], lw["b_d"], delta, vl[:, 6 * r : 7 * r], (0, sh.hidden), *seg)
        if last_only:
            last = inp["q_indptr"][1:] - 1
            delta, res = delta[last], res[last]
        h = add_rmsnorm(delta, res, self.norm, 1e-5)
        logits = h @ self.lm_head.t()
        return torch.argmax(logits, dim=-1)
