"""Attention over several packed training sequences, each with its own optional constant prefix K/V.

Why: training steps are launch-bound if every sample runs its own forward, so a gradient-accumulation micro-batch
packs its samples into one flat token batch (like serving does). Samples trained against a stashed prompt carry
per-layer prefix K/V; the context pads everything into one [B, H, Q, K] SDPA call with a boolean mask
(key j of sequence b is visible to query i iff j <= prefix_b + i), so gradients flow into the new tokens' q/k/v and
never into the prefixes (constants).
"""

from __future__ import annotations

import torch
from lorafleet.worker.layers.attention import _sdpa

PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]


class PackedPrefixAttention:
    def __init__(
        self,
        scale: float,
        q_lens: list[int],
        prefixes: list[PrefixKV | None],
        device: torch.device,
        sliding_window: int | None = None,
    ) -> None:
        self.scale = scale
        self.q_lens = q_lens
        self.prefixes = prefixes
        self.p_lens = [0 if p is None else int(p[0][0].shape[0]) for p in prefixes]
        b = len(q_lens)
        self.batch = b
        self.max_q = max(q_lens)
        self.max_k = max(p + q for p, q in zip(self.p_lens, q_lens, strict=True))
        qb = torch.repeat_interleave(torch.arange(b), torch.tensor(q_lens))
        qp = torch.cat([torch.arange(n) for n in q_lens])
        kp = torch.cat([torch.arange(n) + p for n, p in zip(q_lens, self.p_lens, strict=True)])
        self.q_batch, self.q_pos, self.k_pos = qb.to(device), qp.to(device), kp.to(device)
        p_t = torch.tensor(self.p_lens)[:, None, None]
        n_t = torch.tensor(q_lens)[:, None, None]
        i = torch.arange(self.max_q)[None, :, None]
        j = torch.arange(self.max_k)[None, None, :]
        mask = (j <= p_t + i) & (j < p_t + n_t)
        if sliding_window is not None:
            mask &= j > p_t + i - sliding_window
        mask[:, :, 0] |= i[:, :, 0] >= n_t[:, :, 0]  # padded query rows see one key: no NaN
        self.mask = mask.unsqueeze(1).to(device)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, hq, d = self.batch, q.shape[1], q.shape[2]
        hk = k.shape[1]
        kpad = k.new_zeros(b, self.max_k, hk, d)
        vpad = v.new_zeros(b, self.max_k, hk, d)
        for s, pre in enumerate(self.prefixes):
            if pre is not None and self.p_lens[s]:
                kpad[s, : self.p_lens[s]] = pre[layer_idx][0].to(k.dtype)
                vpad[s, : self.p_lens[s]] = pre[layer_idx][1].to(v.dtype)
        kpad = kpad.index_put((self.q_batch, self.k_pos), k)
        vpad = vpad.index_put((self.q_batch, self.k_pos), v)
        qpad = q.new_zeros(b, self.max_q, hq, d).index_put((self.q_batch, self.q_pos), q)
        out = _sdpa(qpad.transpose(1, 2), kpad.transpose(1, 2), vpad.transpose(1, 2), self.mask, self.scale)
        return out.transpose(1, 2)[self.q_batch, self.q_pos]
