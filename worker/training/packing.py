"""Micro-batch packing for the graphed trainer: whole samples, padded to a few shape buckets.

Why buckets: one CUDA graph is captured per micro-batch shape, so shapes must repeat. A micro-batch packs whole
samples (tokens T, loss rows R, stashed prefix keys P) and is padded to a bucket (multiples of TOKEN_ALIGN /
TOKEN_ALIGN / PREFIX_ALIGN). Padding rows have segment -1 and weight 0; padding prefix keys segment -2, so they
match no token. Everything here is a pure function of the samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lorafleet.worker.training.trainer import TrainSample, forward_ids

TOKEN_ALIGN = 128
PREFIX_ALIGN = 512


def _round_up(n: int, k: int) -> int:
    return max(k, -(-n // k) * k)


@dataclass(frozen=True)
class Bucket:
    tokens: int
    rows: int
    prefix: int


@dataclass
class MicroBatch:
    """One packed micro-batch, built on the host (padded to its bucket); `owners[i]` = sample index of loss row i."""

    bucket: Bucket
    samples: list[int]  # indices into the group's samples
    ids: torch.Tensor
    pos: torch.Tensor
    seg: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    row_w: torch.Tensor
    owners: list[int]
    prefix: list[tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]]  # (segment, per-layer (k, v)) in order
    pseg: torch.Tensor
    ppos: torch.Tensor
    tokens: int  # real (unpadded) tokens

    @property
    def cost(self) -> float:
        """Token units (1 = one token's forward): forward + a backward of about the same size."""
        return 2.0 * self.tokens


def sample_tokens(s: TrainSample) -> int:
    """Tokens a sample forwards: the completion against a stashed prefix, else prompt + completion - 1."""
    return len(s.completion_ids) if s.prefix_kv is not None else len(s.prompt_ids) + len(s.completion_ids) - 1


def pack(samples: list[TrainSample], denom: int, max_tokens: int, max_prefix: int) -> list[MicroBatch]:
    """Greedy packing of whole samples in order; raises ValueError for a sample that fits no micro-batch."""
    out: list[MicroBatch] = []
    cur: list[int] = []
    t = p = 0
    for i, s in enumerate(samples):
        n = sample_tokens(s)
        pl = 0 if s.prefix_kv is None else int(s.prefix_kv[0][0].shape[0])
        if n > max_tokens or pl > max_prefix:
            raise ValueError(f"sample of {n} tokens / {pl} prefix keys exceeds the graphed micro-batch")
        if cur and (t + n > max_tokens or p + pl > max_prefix):
            out.append(_build(samples, cur, denom))
            cur, t, p = [], 0, 0
        cur.append(i)
        t += n
        p += pl
    if cur:
        out.append(_build(samples, cur, denom))
    return out


def _build(samples: list[TrainSample], idx: list[int], denom: int) -> MicroBatch:
    ids, pos, seg, rows, targets, owners, pseg, ppos = ([] for _ in range(8))  # list[int] each
    row_w: list[float] = []
    prefix = []
    for k, i in enumerate(idx):
        s = samples[i]
        x, start, first_loss = forward_ids(s)
        base = len(ids)
        pl = 0 if s.prefix_kv is None else int(s.prefix_kv[0][0].shape[0])  # 0 too for a one-token prompt
        if pl:
            prefix.append((k, s.prefix_kv))
            pseg += [k] * pl
            ppos += list(range(pl))
        ids += x
        pos += range(start, start + len(x))
        seg += [k] * len(x)
        for j, tgt in enumerate(s.completion_ids):
            rows.append(base + first_loss + j)
            targets.append(tgt)
            row_w.append(s.weight / denom)
            owners.append(i)
    n, r, pl = len(ids), len(rows), len(pseg)
    b = Bucket(_round_up(n, TOKEN_ALIGN), _round_up(r, TOKEN_ALIGN), 0 if pl == 0 else _round_up(pl, PREFIX_ALIGN))
    pad_t, pad_r, pad_p = b.tokens - n, b.rows - r, b.prefix - pl
    return MicroBatch(
        bucket=b,
        samples=list(idx),
        ids=torch.tensor(ids + [0] * pad_t),
        pos=torch.tensor(pos + [0] * pad_t),
        seg=torch.tensor(seg + [-1] * pad_t),
        rows=torch.tensor(rows + [0] * pad_r),
        targets=torch.tensor(targets + [-100] * pad_r),
        row_w=torch.tensor(row_w + [0.0] * pad_r, dtype=torch.float32),
        owners=owners,
        prefix=prefix,
        pseg=torch.tensor(pseg + [-2] * pad_p),
        ppos=torch.tensor(ppos + [0] * pad_p),
        tokens=n,
    )
