"""Attention contexts: paged KV for serving, dense causal (with optional prefix K/V) for training.

Why pluggable: the model's attention layer only projects q/k/v, applies rotary and calls `ctx.attend(layer, q,
k, v)`. The paged context writes this step's K/V into the block cache and reads every sequence's context back
through its block table; on CPU (and as the portable GPU fallback) it gathers into a padded batch and runs one
torch SDPA call with a boolean mask, which is exact and simple. The dense context serves training and tests.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionContext(Protocol):
    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hk, D] (already rotated); returns [T, Hq, D]."""
        ...


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [B, Hq, Q, D]; k/v: [B, Hk, K, D]. GQA without materialising repeated K/V (SDPA's enable_gqa, 3x faster
    on CPU); torch versions without it repeat the KV heads instead."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        except TypeError:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class PagedAttentionContext:
    """One step's batch: per sequence a query chunk of `query_lens[i]` tokens starting at `starts[i]`."""

    def __init__(
        self,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer [num_blocks, block_size, Hk, D] each
        slot_mapping: torch.Tensor,  # [T] flat cache slot of every new token
        block_tables: torch.Tensor,  # [B, max_blocks] (padded with 0, masked out)
        starts: list[int],
        query_lens: list[int],
        scale: float,
        sliding_window: int | None = None,
    ) -> None:
        self.kv_caches = kv_caches
        self.slot_mapping = slot_mapping
        self.block_tables = block_tables
        self.scale = scale
        device = slot_mapping.device
        b = len(query_lens)
        block_size = kv_caches[0][0].shape[1]
        max_q = max(query_lens)
        max_kv = block_tables.shape[1] * block_size
        starts_t = torch.tensor(starts)
        lens_t = torch.tensor(query_lens)
        q_batch = torch.repeat_interleave(torch.arange(b), lens_t)
        first_row = torch.cumsum(lens_t, 0) - lens_t
        self.q_batch = q_batch.to(device)
        self.q_pos = (torch.arange(q_batch.shape[0]) - first_row[q_batch]).to(device)
        qj = torch.arange(max_q)
        key = torch.arange(max_kv)
        q_abs = starts_t[:, None] + qj[None, :]  # [B, Q]
        mask = key[None, None, :] <= q_abs[:, :, None]
        if sliding_window is not None:
            mask &= key[None, None, :] > q_abs[:, :, None] - sliding_window
        mask[:, :, 0] |= qj[None, :] >= lens_t[:, None]  # padded query rows: keep one key so SDPA has no NaN
        self.mask = mask.unsqueeze(1).to(device)  # [B, 1, Q, K]
        self.batch = b
        self.max_q = max_q

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.kv_caches[layer_idx]
        nb, bs, hk, d = k_cache.shape
        k_cache.view(nb * bs, hk, d).index_copy_(0, self.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(nb * bs, hk, d).index_copy_(0, self.slot_mapping, v.to(v_cache.dtype))
        keys = k_cache[self.block_tables].flatten(1, 2).transpose(1, 2).to(q.dtype)  # [B, Hk, K, D]
        vals = v_cache[self.block_tables].flatten(1, 2).transpose(1, 2).to(q.dtype)
        qp = q.new_zeros(self.batch, self.max_q, q.shape[1], d)
        qp[self.q_batch, self.q_pos] = q
        out = _sdpa(qp.transpose(1, 2), keys, vals, self.mask, self.scale)  # [B, Hq, Q, D]
        return out.transpose(1, 2)[self.q_batch, self.q_pos]


class TritonPagedAttentionContext:
    """The CUDA path: same semantics as PagedAttentionContext, but only device tensors and the Triton kernel of
    `triton_attention.py` (no host-side lists or masks), so a decode step using it can be captured in a CUDA graph.
    `seq_lens[b]` = tokens of sequence b after this step; its queries are rows q_indptr[b]:q_indptr[b+1]."""

    def __init__(
        self,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        slot_mapping: torch.Tensor,  # [T] int64
        block_tables: torch.Tensor,  # [B, max_blocks] int32
        seq_lens: torch.Tensor,  # [B] int32
        q_indptr: torch.Tensor,  # [B+1] int32
        max_q_len: int,
        scale: float,
    ) -> None:
        from lorafleet.worker.layers.triton_attention import paged_attention

        self._paged_attention = paged_attention
        self.kv_caches = kv_caches
        self.slot_mapping = slot_mapping
        self.block_tables = block_tables
        self.seq_lens = seq_lens
        self.q_indptr = q_indptr
        self.max_q_len = max_q_len
        self.scale = scale

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.kv_caches[layer_idx]
        nb, bs, hk, d = k_cache.shape
        k_cache.view(nb * bs, hk, d).index_copy_(0, self.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(nb * bs, hk, d).index_copy_(0, self.slot_mapping, v.to(v_cache.dtype))
        return self._paged_attention(
            q.contiguous(),
            k_cache,
            v_cache,
            self.block_tables,
            self.seq_lens,
            self.q_indptr,
            self.max_q_len,
            self.scale,
        )


def triton_attention_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from lorafleet.worker.layers import triton_attention  # noqa: F401
    except Exception:  # noqa: BLE001 - no triton: the SDPA path serves
        return False
    return True


class DenseAttentionContext:
    """Causal attention over packed sequences (`seq_lens`), optionally after per-layer prefix K/V (one sequence)."""

    def __init__(
        self,
        scale: float,
        seq_lens: list[int] | None = None,
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        sliding_window: int | None = None,
    ) -> None:
        if prefix_kv is not None and seq_lens is not None and len(seq_lens) != 1:
            raise ValueError("prefix K/V is supported for a single sequence only")
        self.scale = scale
        self.seq_lens = seq_lens
        self.prefix_kv = prefix_kv
        self.sliding_window = sliding_window

    def _mask(self, n: int, p: int, device: torch.device) -> torch.Tensor:
        q_abs = torch.arange(n, device=device)[:, None] + p
        key = torch.arange(n + p, device=device)[None, :]
        mask = key <= q_abs
        if self.sliding_window is not None:
            mask &= key > q_abs - self.sliding_window
        return mask

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        lens = self.seq_lens or [q.shape[0]]
        outs = []
        lo = 0
        for n in lens:
            qs, ks, vs = q[lo : lo + n], k[lo : lo + n], v[lo : lo + n]
            p = 0
            if self.prefix_kv is not None:
                pk, pv = self.prefix_kv[layer_idx]
                p = pk.shape[0]
                ks = torch.cat([pk.to(ks.dtype), ks], 0)
                vs = torch.cat([pv.to(vs.dtype), vs], 0)
            mask = self._mask(n, p, q.device)
            o = _sdpa(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None], mask, self.scale)
            outs.append(o[0].transpose(0, 1))
            lo += n
        return torch.cat(outs, 0)
