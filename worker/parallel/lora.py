"""LoRA over a tensor-parallel model, sharded as vLLM's `fully_sharded_loras`: every rank keeps 1/tp of each adapter.

Per projection (layout in `plan.py`):
- column-parallel (q, k, v, gate, up): shrink with the rank's block of A's rows gives a [T, r/tp] slice of the
  intermediate; one all-gather makes the [T, r] intermediate; expand with the rank's rows of B gives the rank's
  output rows directly.
- row-parallel (o, down): shrink with the rank's columns of A over the rank's sharded input gives a partial [T, r];
  one all-reduce sums it; expand with the rank's block of B's rows adds the delta into that block of the partial
  output, before the layer's own all-reduce, which then sums each block's delta exactly once.
So LoRA costs one collective of T x r values per projection, never a gather of T x hidden.

The serving context uses the same shrink/expand kernels as one GPU (`lorafleet.worker.lora.ops` contract) over
stacked sharded slots; the dense context is autograd-friendly for training, and its gradients are the shards of
the single-GPU gradients (`assemble_grads` puts them back together; replicated KV rows are summed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from lorafleet.worker.lora.adapter import LoRAWeights
from lorafleet.worker.parallel.group import TPGroup
from lorafleet.worker.parallel.plan import COLUMN, ROW, ShardPlan, padded

Pair = tuple[torch.Tensor, torch.Tensor]


def shard_pair(proj: str, a: torch.Tensor, b: torch.Tensor, plan: ShardPlan, rank: int) -> Pair:
    """One rank's (A, B) of one projection: A [r, in] and B [out, r], the rank dimension zero-padded to `rank`
    (itself padded to a multiple of tp). Zero rows of A and columns of B add nothing to the delta."""
    rp = padded(rank, plan.world)
    r = a.shape[0]
    if r > rp:
        raise ValueError(f"adapter rank {r} exceeds the slot rank {rank}")
    a_p = a.new_zeros(rp, a.shape[1])
    a_p[:r] = a
    b_p = b.new_zeros(b.shape[0], rp)
    b_p[:, :r] = b
    if proj in COLUMN:
        _, lo, hi = plan.lora_rank_block(rp)
        rows = plan.rows(proj)
        return a_p[lo:hi].contiguous(), b_p[rows[0] : rows[1]].contiguous()
    cols, out = plan.cols(proj), plan.out_block()
    return a_p[:, cols[0] : cols[1]].contiguous(), b_p[out[0] : out[1]].contiguous()


def shard_adapter(lw: LoRAWeights, plan: ShardPlan, rank: int | None = None) -> dict[tuple[int, str], Pair]:
    """Every projection of one adapter (read against the whole model's shape) as this rank's shards."""
    r = rank or lw.rank
    return {key: shard_pair(key[1], a, b, plan, r) for key, (a, b) in lw.weights.items()}


def assemble_grads(
    shards: Sequence[Mapping[tuple[int, str], Pair]], plans: Sequence[ShardPlan], rank: int
) -> dict[tuple[int, str], Pair]:
    """The single-GPU (A, B) gradients from every rank's shard gradients (tests, and a checkpoint written with tp).

    A KV head held by several ranks (tp > num_kv_heads) has its B rows' gradient split among them: summed here.
    """
    shape = plans[0].shape
    rp = padded(rank, plans[0].world)
    out: dict[tuple[int, str], Pair] = {}
    for key in shards[0]:
        proj = key[1]
        fin, fout = shape.proj_dims(proj)
        ga = torch.zeros(rp, fin, dtype=torch.float64)
        gb = torch.zeros(fout, rp, dtype=torch.float64)
        for s, plan in zip(shards, plans, strict=True):
            a, b = (t.double() for t in s[key])
            if proj in COLUMN:
                _, lo, hi = plan.lora_rank_block(rp)
                ga[lo:hi] += a
                rows = plan.rows(proj)
                gb[rows[0] : rows[1]] += b
            else:
                cols, blk = plan.cols(proj), plan.out_block()
                ga[:, cols[0] : cols[1]] += a
                gb[blk[0] : blk[1]] += b
        out[key] = (ga, gb)
    return out


class ShardedSlots:
    """One rank's adapter slots: stacked, padded, sharded tensors per (layer, projection), the `SlotWeights` view
    the single-GPU adapter store gives the model. Every rank loads the same adapter into the same slot (the leader
    says which, `executor.py`), each reading the files itself and keeping its shard."""

    def __init__(
        self, plan: ShardPlan, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device | None = None
    ) -> None:
        self.plan, self.max_rank = plan, max_rank
        device = device or torch.device("cpu")
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self._stacks: dict[tuple[int, str], Pair] = {}
        for layer in range(plan.shape.num_layers):
            for proj in (*COLUMN, *ROW):
                fin, fout = plan.shape.proj_dims(proj)
                a, b = shard_pair(proj, torch.zeros(1, fin), torch.zeros(fout, 1), plan, max_rank)
                self._stacks[(layer, proj)] = (
                    torch.zeros(num_slots, *a.shape, dtype=dtype, device=device),
                    torch.zeros(num_slots, *b.shape, dtype=dtype, device=device),
                )

    @classmethod
    def of(cls, adapters: Sequence[LoRAWeights], plan: ShardPlan, max_rank: int, dtype: torch.dtype) -> ShardedSlots:
        """Slots 0..n-1 holding `adapters` in order."""
        slots = cls(plan, len(adapters), max_rank, dtype)
        for i, lw in enumerate(adapters):
            slots.load(i, lw)
        return slots

    def load(self, slot: int, lw: LoRAWeights) -> None:
        """Writes this rank's shards of `lw` into `slot`; projections the adapter skips are zeroed."""
        self.free(slot)
        for key, (a, b) in lw.weights.items():
            sa, sb = shard_pair(key[1], a, b, self.plan, self.max_rank)
            ta, tb = self._stacks[key]
            ta[slot].copy_(sa)
            tb[slot].copy_(sb)
        self.scales[slot] = lw.scale

    def free(self, slot: int) -> None:
        for ta, tb in self._stacks.values():
            ta[slot].zero_()
            tb[slot].zero_()
        self.scales[slot] = 0.0

    def stacked(self, layer_idx: int, proj: str, always: bool = False) -> Pair | None:
        return self._stacks.get((layer_idx, proj))

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self._stacks.values())


class ShardedSegmentLoRAContext:
    """Serving: segments of sorted tokens over stacked sharded slots (the single-GPU SegmentLoRAContext's contract)."""

    def __init__(self, slots: ShardedSlots, seg_indptr: torch.Tensor, seg_slots: torch.Tensor, group: TPGroup):
        from lorafleet.worker.lora import dispatch

        self.slots, self.seg_indptr, self.seg_slots, self.group = slots, seg_indptr, seg_slots, group
        self._ops = dispatch.ops_for(seg_indptr.device)

    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = self.slots.stacked(layer_idx, proj)
        if w is None:
            return y
        a, b = w
        g, ops = self.group, self._ops
        v = ops.lora_shrink(x, a, self.seg_indptr, self.seg_slots)
        if proj in COLUMN:
            v = g.copy(g.gather(v, 1))
            return ops.lora_expand(v, b, self.seg_indptr, self.seg_slots, self.slots.scales, y)
        v = g.copy(g.reduce(v))
        lo, hi = self.slots.plan.out_block()
        ops.lora_expand(v, b, self.seg_indptr, self.seg_slots, self.slots.scales, y[:, lo:hi])
        return y


class ShardedDenseLoRAContext:
    """Training: one adapter's trainable shards for every token, in fp32, differentiable through the collectives."""

    def __init__(self, weights: Mapping[tuple[int, str], Pair], scale: float, plan: ShardPlan, group: TPGroup):
        self.weights, self.scale, self.plan, self.group = weights, scale, plan, group

    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = self.weights.get((layer_idx, proj))
        if w is None:
            return y
        a, b = w
        g = self.group
        v = x.to(a.dtype) @ a.t()
        if proj in COLUMN:
            delta = g.copy(g.gather(v, 1)) @ b.t()
            return y + (delta * self.scale).to(y.dtype)
        delta = g.copy(g.reduce(v)) @ b.t()
        lo, hi = self.plan.out_block()
        return y + F.pad(delta * self.scale, (lo, y.shape[-1] - hi)).to(y.dtype)
