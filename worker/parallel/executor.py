"""Drives a tensor-parallel model one operation at a time: the leader decides, every rank executes its shard.

Why a leader and not the same engine on every rank: requests reach the worker over HTTP on one process, at times
no other rank sees, so only one scheduler can exist. Rank 0 runs it; each operation it needs from the model (a
step's forward, an adapter loaded into or freed from a slot) is broadcast first and then run on every rank, since
every sharded layer takes part in collectives. What travels per step is the step's index tensors (token ids,
positions, KV slots, block tables, LoRA segments), never activations; an adapter travels as its path, and every
rank reads and shards the files itself.

One rank is the degenerate case: the leader runs the operation and broadcasts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from lorafleet.worker.layers.attention import PagedAttentionContext
from lorafleet.worker.lora.adapter import read_adapter
from lorafleet.worker.models.llama import LlamaForCausalLM
from lorafleet.worker.parallel.group import TPGroup
from lorafleet.worker.parallel.lora import ShardedSegmentLoRAContext, ShardedSlots


@dataclass(frozen=True)
class TPStep:
    """One step's inputs, in the layout of `engine.model_runner.StepInputs` (tokens sorted by adapter slot)."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] flat KV-cache slot of every new token
    block_tables: torch.Tensor  # [B, max_blocks]
    sample_rows: torch.Tensor  # [N] rows whose logits are wanted
    seg_indptr: torch.Tensor  # [G+1]
    seg_slots: torch.Tensor  # [G], -1 = no adapter
    starts: list[int]
    query_lens: list[int]

    @classmethod
    def of(cls, inp) -> TPStep:
        """From the engine's StepInputs (host copies: they are pickled to the other ranks)."""
        return cls(
            *(
                getattr(inp, f).cpu()
                for f in (
                    "input_ids",
                    "positions",
                    "slot_mapping",
                    "block_tables",
                    "sample_rows",
                    "seg_indptr",
                    "seg_slots",
                )
            ),
            list(inp.starts),
            list(inp.query_lens),
        )


class RankEngine:
    """One rank's shard of everything a step touches: the model, the KV cache of its heads, its adapter slots."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        group: TPGroup,
        num_blocks: int,
        block_size: int,
        num_slots: int,
        max_rank: int,
    ) -> None:
        if getattr(model, "tp_plan", None) is None:
            raise ValueError("RankEngine needs a model sharded by parallel.layers.shard_llama")
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.model, self.group, self.max_rank = model, group, max_rank
        s = model.shape  # the rank's local shape: its KV heads only
        self.kv_caches = [
            tuple(
                torch.zeros(num_blocks, block_size, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=self.device)
                for _ in range(2)
            )
            for _ in range(s.num_layers)
        ]
        self.slots = ShardedSlots(model.tp_plan, num_slots, max_rank, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, step: TPStep) -> torch.Tensor:
        """Logits [N, vocab] of the step's sample rows; every rank ends with the same (gathered) logits."""
        dev = self.device
        attn = PagedAttentionContext(
            self.kv_caches,
            step.slot_mapping.to(dev),
            step.block_tables.to(dev),
            step.starts,
            step.query_lens,
            self.model.attn_scale,
            self.model.shape.sliding_window,
        )
        lora = None
        if bool((step.seg_slots >= 0).any()):
            lora = ShardedSegmentLoRAContext(self.slots, step.seg_indptr.to(dev), step.seg_slots.to(dev), self.group)
        hidden = self.model(step.input_ids.to(dev), step.positions.to(dev), attn, lora)
        return self.model.compute_logits(hidden[step.sample_rows.to(dev)])

    def load(self, slot: int, path: str) -> None:
        lw = read_adapter(Path(path), self.model.full_shape, self.max_rank)
        self.slots.load(slot, lw)

    def free(self, slot: int) -> None:
        self.slots.free(slot)


_OPS = ("forward", "load", "free")


class Leader:
    """Rank 0's handle on the group: each call is broadcast, then run here too."""

    def __init__(self, engine: RankEngine) -> None:
        if engine.group.rank != 0:
            raise ValueError("only rank 0 leads")
        self.engine = engine

    def _send(self, op: str, *args) -> None:
        if self.engine.group.world > 1:
            dist.broadcast_object_list([(op, args)], src=0, group=self.engine.group.pg)

    def forward(self, step: TPStep) -> torch.Tensor:
        self._send("forward", step)
        return self.engine.forward(step)

    def load(self, slot: int, path: str) -> None:
        # read here first: an adapter that does not validate fails on the leader before any rank has changed
        read_adapter(Path(path), self.engine.model.full_shape, self.engine.max_rank)
        self._send("load", slot, str(path))
        self.engine.load(slot, str(path))

    def free(self, slot: int) -> None:
        self._send("free", slot)
        self.engine.free(slot)

    def stop(self) -> None:
        self._send("stop")


def follow(engine: RankEngine) -> int:
    """A follower's whole life: run what the leader broadcasts until it says stop; returns the operations run."""
    if engine.group.rank == 0:
        raise ValueError("rank 0 leads; it does not follow")
    done = 0
    while True:
        msg: list = [None]
        dist.broadcast_object_list(msg, src=0, group=engine.group.pg)
        op, args = msg[0]
        if op == "stop":
            return done
        if op not in _OPS:
            raise ValueError(f"unknown tensor-parallel operation {op!r}")
        getattr(engine, op)(*args)
        done += 1
