"""The tensor-parallel group and the collectives sharded layers are built from.

Why three autograd functions and not `torch.distributed` calls inline: the gradient of a collective depends on who
consumes its output. A tensor that every rank goes on to use identically (the residual stream, the logits) needs
no communication backwards; one that each rank consumes with its own shard of a weight (the input of a column-
parallel projection, the rank-r LoRA intermediate) must sum the ranks' gradients. So every sharded layer is written
with these three (Megatron-LM's f and g, plus a gather), and the backward pass is right by construction:

- `copy`: identity forward, all-reduce backward. Marks a replicated tensor entering per-rank consumers.
- `reduce`: all-reduce forward, identity backward. Sums per-rank partial results into a replicated tensor.
- `gather`: all-gather along a dimension forward, the rank's own slice backward. Concatenates per-rank shards into
  a replicated tensor.

A tensor gathered or reduced for per-rank consumers is `copy(gather(x))` / `copy(reduce(x))`. With one rank all
three are the identity, so tp=1 runs the same code without a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """One rank's view of its tensor-parallel group (`pg` None: the default group, or no group when world is 1)."""

    rank: int = 0
    world: int = 1
    pg: object | None = None

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"invalid tensor-parallel rank {self.rank} of {self.world}")

    def copy(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.world == 1 else _Copy.apply(x, self)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.world == 1 else _Reduce.apply(x, self)

    def gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return x if self.world == 1 else _Gather.apply(x, self, dim)

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """In-place sum over the group, no autograd (gradient bookkeeping, e.g. replicated LoRA rows)."""
        if self.world > 1:
            dist.all_reduce(x, group=self.pg)
        return x


def init_from_env(backend: str | None = None) -> TPGroup:
    """Joins the group described by torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    NCCL on CUDA, gloo on CPU unless `backend` says otherwise. One rank and no variables: a group of one, no
    process group at all.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world == 1:
        return TPGroup()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, rank=rank, world_size=world)
    return TPGroup(rank=dist.get_rank(), world=dist.get_world_size())


def _all_reduce(x: torch.Tensor, g: TPGroup) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, group=g.pg)
    return out


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, g: TPGroup) -> torch.Tensor:
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad, ctx.g), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, g: TPGroup) -> torch.Tensor:
        return _all_reduce(x, g)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, g: TPGroup, dim: int) -> torch.Tensor:
        ctx.g, ctx.dim, ctx.size = g, dim, x.shape[dim]
        parts = [torch.empty_like(x) for _ in range(g.world)]
        dist.all_gather(parts, x.contiguous(), group=g.pg)
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.narrow(ctx.dim, ctx.g.rank * ctx.size, ctx.size).contiguous(), None, None
