"""Triton paged attention: one kernel for decode (1 query per sequence) and prefill/extend (causal over a paged prefix).

Layout (vLLM "flash" layout): `k_cache`, `v_cache` are `[num_blocks, block_size, num_kv_heads, head_dim]`; a
sequence's tokens live in the blocks listed by its row of `block_table` (`[num_seqs, max_blocks]`, int32); the new
query tokens of sequence b are rows `q_indptr[b]:q_indptr[b+1]` of `q` (`[num_tokens, num_heads, head_dim]`) and are
the LAST `q_len` positions of its `seq_lens[b]` tokens (their K/V must already be written to the cache).

Why one kernel with GQA packing: a program owns one (sequence, KV head, tile of query rows) and packs the query
heads that share that KV head into the M dimension (row = token * group + head). Decode then reads each KV block
once per KV head instead of once per query head, and even a single query token gives a 16-row tile for the tensor
cores. Prefill/extend uses the same loop with a causal mask (key position <= query position). Softmax is the online
(flash) form in fp32. Nothing depends on host-side values except `max_q_len` (the scheduler knows it), so decode
launches are CUDA-graph capturable. Sequences with `seq_lens == 0` (graph padding) write zeros.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attn_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    block_table,
    seq_lens,
    q_indptr,
    sm_scale,
    sq_t,
    sq_h,
    sk_b,
    sk_s,
    sk_h,
    sv_b,
    sv_s,
    sv_h,
    so_t,
    so_h,
    sbt_b,
    GROUP: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    pid_m = tl.program_id(2)
    q_lo = tl.load(q_indptr + b)
    q_len = tl.load(q_indptr + b + 1) - q_lo
    ctx = tl.load(seq_lens + b)
    if pid_m * BLOCK_M >= q_len * GROUP:
        return
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = r // GROUP
    head = kvh * GROUP + r % GROUP
    row_ok = tok < q_len
    q_pos = ctx - q_len + tok
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(
        q_ptr + (q_lo + tok)[:, None].to(tl.int64) * sq_t + head[:, None] * sq_h + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    max_pos = tl.minimum(ctx - q_len + (pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, ctx - 1)
    n_end = max_pos + 1
    qk_scale = sm_scale * 1.4426950408889634
    for n0 in range(0, n_end, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)
        k_ok = kpos < n_end
        page = tl.load(block_table + b * sbt_b + kpos // PAGE, mask=k_ok, other=0).to(tl.int64)
        off = kpos % PAGE
        k = tl.load(
            k_ptr + page[:, None] * sk_b + off[:, None] * sk_s + kvh * sk_h + d[None, :],
            mask=k_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k)) * qk_scale
        valid = (kpos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + page[:, None] * sv_b + off[:, None] * sv_s + kvh * sv_h + d[None, :],
            mask=k_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        o_ptr + (q_lo + tok)[:, None].to(tl.int64) * so_t + head[:, None] * so_h + d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    q_indptr: torch.Tensor,
    max_q_len: int,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the new query tokens over each sequence's paged K/V (see module docstring for layout)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    page = k_cache.shape[1]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and out.stride(2) == 1
    block_m = max(16, min(64, triton.next_power_of_2(max_q_len * group)))
    block_n = 64 if max_q_len > 1 else 32
    block_n = max(block_n, page) if page <= 128 else block_n
    grid = (num_seqs, num_kv_heads, triton.cdiv(max_q_len * group, block_m))
    _paged_attn_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_table,
        seq_lens,
        q_indptr,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        block_table.stride(0),
        GROUP=group,
        PAGE=page,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=4,
        num_stages=2,
    )
    return out


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    q_indptr: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Same function through `scaled_dot_product_attention` per sequence (gathers the pages): the test oracle and
    the CPU path. Slow for many sequences (one call each), which is why the GPU uses the kernel above."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    page = k_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    lens = seq_lens.tolist()
    bounds = q_indptr.tolist()
    for b, ctx in enumerate(lens):
        lo, hi = bounds[b], bounds[b + 1]
        if hi <= lo or ctx == 0:
            continue
        n_pages = (ctx + page - 1) // page
        pages = block_table[b, :n_pages].long()
        k = k_cache[pages].reshape(-1, num_kv_heads, head_dim)[:ctx]
        v = v_cache[pages].reshape(-1, num_kv_heads, head_dim)[:ctx]
        k = k.repeat_interleave(group, dim=1).transpose(0, 1).float()
        v = v.repeat_interleave(group, dim=1).transpose(0, 1).float()
        qb = q[lo:hi].transpose(0, 1).float()
        q_len = hi - lo
        qpos = torch.arange(ctx - q_len, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale)
        out[lo:hi] = o.transpose(0, 1).to(q.dtype)
    return out
