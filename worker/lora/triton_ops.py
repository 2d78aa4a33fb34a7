"""Triton SGMV-style batched LoRA kernels with exactly the contract of `ops.py` (shrink into fp32, expand in place).

Why this design (Punica SGMV, SGLang csgmv):
- The grid tiles the *sorted token dimension* (BLOCK_M rows), not (segment x max segment length). That needs no
  host-side maximum segment length, so nothing syncs with the GPU and the launch can be captured in a CUDA graph
  with padded inputs (`cuda_graph.py` pads `seg_indptr` with empty segments and `seg_slots` with -1).
- A tile may straddle several segments (decode: a few tokens per adapter). The program finds its first and last
  segment by binary search over `seg_indptr`, then for each segment masks the rows it owns and accumulates
  `where(row in segment, x, 0) · A[slot]ᵀ` into ONE accumulator: rows of different segments are disjoint, so the
  sum over segments is exactly the per-row result. Each adapter's weights are read once per tile it touches.
  With one token per segment this degenerates into BGMV (per-token adapter), so decode needs no second kernel.
- Shrink (N = rank, tiny) is split over K so that a batch of a few tiles still fills the GPU; partial sums go
  through fp32 atomics into the zeroed `out`. Expand tiles (M, N) and adds `scale * v · Bᵀ` into `y` in place,
  accumulating in fp32 (tf32 dot) and rounding once.
- Mixed ranks share one stacked tensor padded to max rank with zeros (the store's layout), so padding rows
  contribute exactly zero.
Beyond the contract, for models with fused projections: `lora_shrink_accumulate` (adds into a buffer zeroed once
per step, saving one memset launch per projection) and `lora_expand_slices` (q/k/v or gate/up in one launch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _find_segment(seg_indptr, t, G, LOG_G: tl.constexpr):
    """Largest g in [0, G-1] with seg_indptr[g] <= t; skips empty (padding) segments that share a boundary."""
    lo = t * 0
    hi = lo + G - 1
    for _ in range(LOG_G):
        mid = (lo + hi + 1) // 2
        ok = tl.load(seg_indptr + mid) <= t
        active = lo < hi
        lo = tl.where(active & ok, mid, lo)
        hi = tl.where(active & (ok == 0), mid - 1, hi)
    return lo


@triton.jit(do_not_specialize=["T", "G"])
def _shrink_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    seg_indptr,
    seg_slots,
    T,
    K,
    R,
    G,
    sx_t,
    sx_k,
    sa_s,
    sa_r,
    sa_k,
    so_t,
    so_r,
    K_PER_SPLIT,
    LOG_G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    row0 = pid_m * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    last = tl.minimum(row0 + BLOCK_M, T) - 1
    g_first = _find_segment(seg_indptr, row0, G, LOG_G)
    g_last = _find_segment(seg_indptr, last, G, LOG_G)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    kk = tl.arange(0, BLOCK_K)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for g in range(g_first, g_last + 1):
        slot = tl.load(seg_slots + g).to(tl.int64)
        lo = tl.load(seg_indptr + g)
        hi = tl.load(seg_indptr + g + 1)
        if (slot >= 0) & (hi > lo):
            in_seg = (rows >= lo) & (rows < hi) & row_ok
            a_base = a_ptr + slot * sa_s
            for k0 in range(k_begin, k_end, BLOCK_K):
                ks = k0 + kk
                k_ok = ks < k_end
                x = tl.load(
                    x_ptr + rows[:, None].to(tl.int64) * sx_t + ks[None, :] * sx_k,
                    mask=in_seg[:, None] & k_ok[None, :],
                    other=0.0,
                )
                a = tl.load(
                    a_base + ks[:, None] * sa_k + rr[None, :] * sa_r,
                    mask=k_ok[:, None] & r_ok[None, :],
                    other=0.0,
                )
                acc += tl.dot(x, a.to(x.dtype))
    o_ptrs = out_ptr + rows[:, None].to(tl.int64) * so_t + rr[None, :] * so_r
    o_mask = row_ok[:, None] & r_ok[None, :]
    if ATOMIC:
        tl.atomic_add(o_ptrs, acc, mask=o_mask)
    else:
        tl.store(o_ptrs, acc, mask=o_mask)


@triton.jit(do_not_specialize=["T", "G"])
def _expand_kernel(
    v_ptr,
    b_ptr,
    y_ptr,
    seg_indptr,
    seg_slots,
    scales_ptr,
    T,
    N,
    R,
    G,
    N1,
    N2,
    sv_t,
    sv_r,
    sb_s,
    sb_n,
    sb_r,
    sy_t,
    sy_n,
    LOG_G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    row0 = pid_m * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    last = tl.minimum(row0 + BLOCK_M, T) - 1
    g_first = _find_segment(seg_indptr, row0, G, LOG_G)
    g_last = _find_segment(seg_indptr, last, G, LOG_G)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    col0 = pid_n * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    c_ok = cols < N
    # output slices: columns [0, N1) use v[:, 0:R], [N1, N2) v[:, R:2R], [N2, N) v[:, 2R:3R]
    col_last = tl.minimum(col0 + BLOCK_N, N) - 1
    s_first = (col0 >= N1).to(tl.int32) + (col0 >= N2).to(tl.int32)
    s_last = (col_last >= N1).to(tl.int32) + (col_last >= N2).to(tl.int32)
    col_slice = (cols >= N1).to(tl.int32) + (cols >= N2).to(tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    touched = tl.zeros((BLOCK_M,), dtype=tl.int1)
    for g in range(g_first, g_last + 1):
        slot = tl.load(seg_slots + g).to(tl.int64)
        lo = tl.load(seg_indptr + g)
        hi = tl.load(seg_indptr + g + 1)
        if (slot >= 0) & (hi > lo):
            in_seg = (rows >= lo) & (rows < hi) & row_ok
            touched = touched | in_seg
            scale = tl.load(scales_ptr + slot)
            for sl in range(s_first, s_last + 1):
                v = tl.load(
                    v_ptr + rows[:, None].to(tl.int64) * sv_t + (sl * R + rr[None, :]) * sv_r,
                    mask=in_seg[:, None] & r_ok[None, :],
                    other=0.0,
                )
                b = tl.load(
                    b_ptr + slot * sb_s + rr[:, None] * sb_r + cols[None, :].to(tl.int64) * sb_n,
                    mask=r_ok[:, None] & (c_ok & (col_slice == sl))[None, :],
                    other=0.0,
                )
                acc += tl.dot(v * scale, b.to(tl.float32))
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * sy_t + cols[None, :] * sy_n
    y_mask = touched[:, None] & c_ok[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


def _log_g(g: int) -> int:
    """Binary-search depth, rounded up to a multiple of 4 so a handful of compiled variants cover every G."""
    return max(4, (int(g).bit_length() + 3) // 4 * 4)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _shrink_config(t: int, k: int, tune: dict[str, int]) -> tuple[int, int, int]:
    """BLOCK_M, BLOCK_K, SPLIT_K: small M tiles for decode, split K until ~4 programs per SM (132 on H100/H200):
    a decode batch has only T/16 row tiles, and each program's loop over its segments is latency bound."""
    block_m = tune.get("block_m", 16 if t <= 512 else 64)
    block_k = tune.get("block_k", 128 if t <= 512 else 64)
    max_split = tune.get("split", 64)
    m_tiles = triton.cdiv(t, block_m)
    split = 1
    while split * 2 <= max_split and m_tiles * split < 512 and k // (split * 2) >= 2 * block_k:
        split *= 2
    return block_m, block_k, split


def lora_shrink_accumulate(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """out[t] += x[t] · A[slot(t)]ᵀ (fp32 atomics). Lets a model zero ONE buffer per step for all its shrinks
    instead of one memset per projection (a memset is a kernel launch: ~4 µs x 4 x layers per decode step)."""
    t, k = x.shape
    r = lora_a.shape[1]
    g = seg_slots.shape[0]
    if t == 0 or g == 0:
        return out
    _launch_shrink(x, lora_a, seg_indptr, seg_slots, out, t, k, r, g, atomic=True)
    return out


# Launch parameters by regime ("decode": T <= 512 rows, else "prefill"); filled from a sweep on an H200
# (bench/lora_kernel_bench.py). Keys: block_m, block_k / block_n, split (shrink: max K splits), num_warps, num_stages.
# 2026-11-22 H200 sweep (bench/results/engine_lora_kernels.json): expand 31.9 -> 23.7 us, shrink 16.3 -> 15.5 us
# (qkv + gate|up / qkv + down at 256 rows, 32 adapters, timed from CUDA-graph replays).
TUNING: dict[str, dict[str, int]] = {
    "shrink_decode": {"block_m": 16, "block_k": 128, "split": 16, "num_warps": 4, "num_stages": 3},
    "shrink_prefill": {},
    "expand_decode": {"block_m": 16, "block_n": 128, "num_warps": 2, "num_stages": 2},
    "expand_prefill": {},
}


def _launch_shrink(x, lora_a, seg_indptr, seg_slots, out, t, k, r, g, atomic: bool) -> None:
    tune = TUNING["shrink_decode" if t <= 512 else "shrink_prefill"]
    block_m, block_k, split = _shrink_config(t, k, tune)
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per_split)
    grid = (triton.cdiv(t, block_m), split)
    _shrink_kernel[grid](
        x,
        lora_a,
        out,
        seg_indptr,
        seg_slots,
        t,
        k,
        r,
        g,
        x.stride(0),
        x.stride(1),
        lora_a.stride(0),
        lora_a.stride(1),
        lora_a.stride(2),
        out.stride(0),
        out.stride(1),
        k_per_split,
        LOG_G=_log_g(g),
        BLOCK_M=block_m,
        BLOCK_R=_block_r(r),
        BLOCK_K=block_k,
        ATOMIC=atomic or split > 1,
        num_warps=tune.get("num_warps", 4),
        num_stages=tune.get("num_stages", 3),
    )


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """v[t] = x[t] · A[slot(t)]ᵀ in fp32; rows of segments without an adapter are zero. Same contract as ops.py."""
    t, k = x.shape
    r = lora_a.shape[1]
    if out is None:
        out = torch.zeros(t, r, dtype=torch.float32, device=x.device)
    else:
        out.zero_()
    g = seg_slots.shape[0]
    if t == 0 or g == 0:
        return out
    _launch_shrink(x, lora_a, seg_indptr, seg_slots, out, t, k, r, g, atomic=False)
    return out


def lora_expand_slices(
    v: torch.Tensor,
    lora_b: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    scales: torch.Tensor,
    y: torch.Tensor,
    bounds: tuple[int, ...],
) -> torch.Tensor:
    """Fused expand for a fused projection (qkv, gate|up): output columns [bounds[i], bounds[i+1]) get
    scale * v[:, i*R:(i+1)*R] · B[slot][bounds[i]:bounds[i+1]]ᵀ, where B stacks the slices' B matrices along
    the output dim ([S, N, R]). Same result as one `lora_expand` per slice, in one launch (up to 3 slices)."""
    t, n = y.shape
    r = lora_b.shape[2]
    g = seg_slots.shape[0]
    if len(bounds) < 2 or len(bounds) > 4 or bounds[0] != 0 or bounds[-1] != n:
        raise ValueError(f"bounds must be 0 < ... < {n} with 1 to 3 slices, got {bounds}")
    if v.shape[1] < (len(bounds) - 1) * r or lora_b.shape[1] != n:
        raise ValueError("v must hold R columns per slice and lora_b one row per output column")
    if t == 0 or g == 0:
        return y
    n1 = bounds[1] if len(bounds) > 2 else n
    n2 = bounds[2] if len(bounds) > 3 else n
    tune = TUNING["expand_decode" if t <= 512 else "expand_prefill"]
    block_m = tune.get("block_m", 16 if t <= 512 else 64)
    block_n = tune.get("block_n", 128 if t <= 512 else 64)
    grid = (triton.cdiv(t, block_m), triton.cdiv(n, block_n))
    _expand_kernel[grid](
        v,
        lora_b,
        y,
        seg_indptr,
        seg_slots,
        scales,
        t,
        n,
        r,
        g,
        n1,
        n2,
        v.stride(0),
        v.stride(1),
        lora_b.stride(0),
        lora_b.stride(1),
        lora_b.stride(2),
        y.stride(0),
        y.stride(1),
        LOG_G=_log_g(g),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=_block_r(r),
        num_warps=tune.get("num_warps", 4),
        num_stages=tune.get("num_stages", 3),
    )
    return y


def lora_expand(
    v: torch.Tensor,
    lora_b: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    scales: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    """y[t] += scale[slot] * v[t] · B[slot]ᵀ in place (fp32 accumulation, one rounding). Same contract as ops.py."""
    return lora_expand_slices(v, lora_b, seg_indptr, seg_slots, scales, y, (0, y.shape[1]))
