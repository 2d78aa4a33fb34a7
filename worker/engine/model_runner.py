"""Turns a scheduled batch into flat model inputs, runs the forward over the paged KV cache, and samples.

Why sort by adapter slot: the batched-LoRA ops want each adapter's tokens contiguous (Punica segments), so the
batch is stably reordered by slot, `seg_indptr`/`seg_slots` are built from the runs, and results are mapped back.
The GPU helper's CUDA-graph decode runner plugs in at `self.graph_runner` (see `_forward`).
"""

from __future__ import annotations

import time

import torch
from lorafleet.worker.engine.sampler import Sampler
from lorafleet.worker.engine.scheduler import ScheduledBatch
from lorafleet.worker.engine.sequence import Sequence
from lorafleet.worker.layers.attention import PagedAttentionContext
from lorafleet.worker.layers.lora_context import SegmentLoRAContext
from lorafleet.worker.lora.store import AdapterStore
from lorafleet.worker.models.llama import LlamaForCausalLM


def kv_block_bytes(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    s = model.shape
    return 2 * s.num_layers * block_size * s.num_kv_heads * s.head_dim * torch.tensor([], dtype=dtype).element_size()


class StepInputs:
    """Flat tensors for one forward: tokens sorted by adapter, their positions, KV slots and LoRA segments."""

    def __init__(self, seqs: list[Sequence], num_tokens: list[int], block_size: int, device: torch.device) -> None:
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].slot)
        self.order = order
        ids: list[int] = []
        pos: list[int] = []
        slot_map: list[int] = []
        starts, qlens, tables = [], [], []
        sample_rows: list[int] = []  # flat row of the last token of each sequence that samples this step
        self.sample_seqs: list[Sequence] = []
        seg_slots: list[int] = []
        seg_indptr = [0]
        for i in order:
            seq, n = seqs[i], num_tokens[i]
            start = seq.num_computed_tokens
            ids += seq.token_ids[start : start + n]
            bt = seq.block_table
            for p in range(start, start + n):
                pos.append(p)
                slot_map.append(bt[p // block_size] * block_size + p % block_size)
            starts.append(start)
            qlens.append(n)
            tables.append(bt)
            if start + n == seq.num_tokens:
                sample_rows.append(len(ids) - 1)
                self.sample_seqs.append(seq)
            if seg_slots and seg_slots[-1] == seq.slot:
                seg_indptr[-1] = len(ids)
            else:
                seg_slots.append(seq.slot)
                seg_indptr.append(len(ids))
        max_blocks = max(len(t) for t in tables)
        padded = [t + [0] * (max_blocks - len(t)) for t in tables]
        self.input_ids = torch.tensor(ids, dtype=torch.long, device=device)
        self.positions = torch.tensor(pos, dtype=torch.long, device=device)
        self.slot_mapping = torch.tensor(slot_map, dtype=torch.long, device=device)
        self.block_tables = torch.tensor(padded, dtype=torch.long, device=device)
        self.starts = starts
        self.query_lens = qlens
        self.sample_rows = torch.tensor(sample_rows, dtype=torch.long, device=device)
        self.seg_indptr = torch.tensor(seg_indptr, dtype=torch.int32, device=device)
        self.seg_slots = torch.tensor(seg_slots, dtype=torch.int32, device=device)
        self.seg_slot_list = seg_slots
        self.is_decode = all(n == 1 for n in num_tokens)


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, store: AdapterStore, num_blocks: int, block_size: int, seed: int = 0
    ) -> None:
        self.model = model
        self.store = store
        self.block_size = block_size
        self.num_blocks = num_blocks
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        s = model.shape
        self.kv_caches = [
            (
                torch.zeros(num_blocks, block_size, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=self.device),
                torch.zeros(num_blocks, block_size, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=self.device),
            )
            for _ in range(s.num_layers)
        ]
        self.sampler = Sampler(self.device, seed)
        self.graph_runner = None  # set by worker/engine/cuda_graph.py on GPU (decode-only batches)
        # Activation recording (worker/training/stash.py): `capture_hook(batch, inputs)` returns a model `capture`
        # callable for this step, or None. Only consulted for batches with prefill tokens.
        self.capture_hook = None
        self._capture = None
        self.last_forward_seconds = 0.0

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        return StepInputs(batch.seqs, batch.num_tokens, self.block_size, self.device)

    def _forward(self, inp: StepInputs) -> torch.Tensor:
        """Hidden states of the sampled rows [N, H]."""
        if self.graph_runner is not None and inp.is_decode and self.graph_runner.can_run(inp):
            return self.graph_runner.run(inp)
        attn = PagedAttentionContext(
            self.kv_caches,
            inp.slot_mapping,
            inp.block_tables,
            inp.starts,
            inp.query_lens,
            self.model.attn_scale,
            self.model.shape.sliding_window,
        )
        lora = None
        if any(s >= 0 for s in inp.seg_slot_list):
            self.store.wait_ready([s for s in inp.seg_slot_list if s >= 0])
            lora = SegmentLoRAContext(self.store, inp.seg_indptr, inp.seg_slots)
        hidden = self.model(inp.input_ids, inp.positions, attn, lora, self._capture)
        return hidden[inp.sample_rows]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> dict[Sequence, int]:
        """Runs one step; returns the sampled token of every sequence whose chunk reached its last token."""
        t0 = time.perf_counter()
        inp = self.prepare(batch)
        self._capture = self.capture_hook(batch, inp) if self.capture_hook is not None and not inp.is_decode else None
        hidden = self._forward(inp)
        self._capture = None
        out: dict[Sequence, int] = {}
        if inp.sample_seqs:
            logits = self.model.compute_logits(hidden)
            tokens = self.sampler(logits, [s.params for s in inp.sample_seqs], [s.generator for s in inp.sample_seqs])
            out = dict(zip(inp.sample_seqs, tokens, strict=True))
        self.last_forward_seconds = time.perf_counter() - t0
        return out

    @torch.inference_mode()
    def logits_for(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """Like `execute` but returns the raw logits (tests compare them with transformers + peft)."""
        inp = self.prepare(batch)
        hidden = self._forward(inp)
        return inp.sample_seqs, self.model.compute_logits(hidden)
