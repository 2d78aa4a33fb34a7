"""Triton kernels for the serving forward's elementwise work: RMSNorm (with the residual add), rotary, SiLU-and-mul.

Why: in eager torch a Llama layer issues ~25 small elementwise kernels (RMSNorm alone is cast, pow, mean, add,
rsqrt, mul, cast, mul; rotary gathers, casts, negates, concatenates). In a decode step each costs a few
microseconds whatever the batch, and together they were ~1.1 ms of a 4.7 ms 64-sequence decode step of the 1B shape
(bench/results/cl_fused_profile.json, `plain_top`), more than the weight GEMMs. Here a layer issues four: an
RMSNorm, a rotary, a SiLU-and-mul, and an RMSNorm fused with the residual add before it.

Each kernel rounds to the activation dtype wherever HF's eager code does (`.to(dtype)`, every bf16 binary op), so
outputs equal the torch path's except where the fp32 sum of squares (or exp) rounds differently. On an H200 in bf16,
rotary matched torch bit for bit; SiLU-and-mul stayed within 1 ulp on <= 1% of the elements, and RMSNorm differed on
~0.1% of them, by at most 2 ulps (tests/worker/test_triton_elementwise.py).
The torch layers stay the reference and serve CPU and autograd (training replays).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["eps"])
def _rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    out_ptr,
    h_ptr,
    sx,
    sr,
    so,
    sh,
    H,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < H
    x = tl.load(x_ptr + row * sx + cols, mask=m, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + row * sr + cols, mask=m, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # torch adds in fp32 and rounds once
        tl.store(h_ptr + row * sh + cols, x, mask=m)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / H
    y = (xf * (1.0 / tl.sqrt(var + eps))).to(x.dtype)  # HF: (h * rsqrt(var + eps)).to(dtype)
    w = tl.load(w_ptr + cols, mask=m, other=0.0)
    tl.store(out_ptr + row * so + cols, (w.to(tl.float32) * y.to(tl.float32)).to(x.dtype), mask=m)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`weight * norm(x)`; with `residual`, first `x = x + residual` and returns `(norm(x), x)` (one kernel)."""
    t, h = x.shape
    out = torch.empty_like(x)
    hs = torch.empty_like(x) if residual is not None else out
    r = residual if residual is not None else x
    if t:
        _rms_norm_kernel[(t,)](
            x, r, weight, out, hs, x.stride(0), r.stride(0), out.stride(0), hs.stride(0), h, eps,
            HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(h), num_warps=4 if h <= 4096 else 8,
        )  # fmt: skip
    return out if residual is None else (out, hs)


@triton.jit
def _rotate_heads(
    src, dst, t, stride_t, stride_h, n, c1, c2, s1, s2, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr
):
    """x * cos + rotate_half(x) * sin for one token's `n` heads; rotate_half(x) = cat(-x2, x1). Every product and
    the sum round to the output dtype, as torch's bf16 ops do."""
    dt = dst.dtype.element_ty
    hh = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    m = (hh[:, None] < n) & (d[None, :] < HALF)
    base = src + t * stride_t + hh[:, None] * stride_h + d[None, :]
    x1 = tl.load(base, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=m, other=0.0).to(tl.float32)
    o1 = ((x1 * c1[None, :]).to(dt).to(tl.float32) + (-x2 * s1[None, :]).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c2[None, :]).to(dt).to(tl.float32) + (x1 * s2[None, :]).to(dt).to(tl.float32)).to(dt)
    out = dst + t * n * (2 * HALF) + hh[:, None] * (2 * HALF) + d[None, :]
    tl.store(out, o1, mask=m)
    tl.store(out + HALF, o2, mask=m)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    sq_t,
    sq_h,
    sk_t,
    sk_h,
    sc,
    HQ,
    HK,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < HALF
    dt = qo_ptr.dtype.element_ty
    # HF casts the fp32 tables to the activation dtype before multiplying
    c1 = tl.load(cos_ptr + pos * sc + d, mask=dm, other=0.0).to(dt).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * sc + HALF + d, mask=dm, other=0.0).to(dt).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * sc + d, mask=dm, other=0.0).to(dt).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * sc + HALF + d, mask=dm, other=0.0).to(dt).to(tl.float32)
    _rotate_heads(q_ptr, qo_ptr, t, sq_t, sq_h, HQ, c1, c2, s1, s2, HALF, BLOCK_HQ, BLOCK_D)
    _rotate_heads(k_ptr, ko_ptr, t, sk_t, sk_h, HK, c1, c2, s1, s2, HALF, BLOCK_HK, BLOCK_D)


def rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[T, Hq, D]`, k `[T, Hk, D]` (views of the fused q|k|v output are fine: the last dim must be contiguous);
    returns new contiguous rotated tensors. `cos` / `sin`: the fp32 `[max_pos, D]` tables."""
    t, hq, dh = q.shape
    hk = k.shape[1]
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1 or dh % 2:
        raise ValueError("rotary kernel needs a contiguous, even head dim")
    qo = torch.empty(t, hq, dh, dtype=q.dtype, device=q.device)
    ko = torch.empty(t, hk, dh, dtype=k.dtype, device=k.device)
    if t:
        _rotary_kernel[(t,)](
            q, k, qo, ko, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
            hq, hk, HALF=dh // 2, BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
            BLOCK_D=triton.next_power_of_2(dh // 2), num_warps=4,
        )  # fmt: skip
    return qo, ko


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, sg, su, so, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < N
    g = tl.load(g_ptr + row * sg + cols, mask=m, other=0.0)
    u = tl.load(u_ptr + row * su + cols, mask=m, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # F.silu rounds to the input dtype, then the product rounds again
    tl.store(o_ptr + row * so + cols, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `[T, I]` operands, e.g. the two halves of the fused gate|up output (row-strided)."""
    t, n = gate.shape
    if gate.stride(1) != 1 or up.stride(1) != 1:
        raise ValueError("silu_and_mul needs rows with a contiguous last dim")
    out = torch.empty(t, n, dtype=gate.dtype, device=gate.device)
    if t:
        block = 1024
        _silu_mul_kernel[(t, triton.cdiv(n, block))](
            gate, up, out, gate.stride(0), up.stride(0), out.stride(0), n, BLOCK=block, num_warps=4
        )
    return out
