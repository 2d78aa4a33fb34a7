"""Runs one scheduled batch: builds its flat inputs (step_inputs.py), runs the forward over the paged KV cache, samples.

On CUDA the attention is the Triton paged kernel (device tensors only) and steps replay CUDA graphs
(`graph_capture.py`: sets without LoRA, with LoRA, and over the merged copy); elsewhere the SDPA context serves
every batch. With merge switching (`merge_switch.py`, dLoRA) each step first settles whether one adapter is served
merged into a copy of the base weights; that happens here, between steps, before the step's inputs are built.
`launch` is the async-scheduling variant of `execute`: the sampled tokens stay on the device, the next step's
inputs take them from there (a placeholder id on the host), and their copy to the host runs on a side stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from lorafleet.worker.engine.block_table import DeviceBlockTables
from lorafleet.worker.engine.graph_capture import capture_graphs
from lorafleet.worker.engine.merge_switch import MergeSwitch
from lorafleet.worker.engine.plugin import PrefillRecord
from lorafleet.worker.engine.sampler import Sampler
from lorafleet.worker.engine.scheduler import ScheduledBatch
from lorafleet.worker.engine.sequence import Sequence
from lorafleet.worker.engine.step_inputs import PLACEHOLDER, SampledTokens, StepInputs, _pad_tables
from lorafleet.worker.layers.attention import (
    PagedAttentionContext,
    TritonPagedAttentionContext,
    triton_attention_available,
)
from lorafleet.worker.layers.lora_context import SegmentLoRAContext
from lorafleet.worker.lora.store import AdapterStore
from lorafleet.worker.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)
__all__ = ["PLACEHOLDER", "ModelRunner", "SampledTokens", "StepInputs", "_pad_tables", "kv_block_bytes"]


def kv_block_bytes(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    s = model.shape
    return 2 * s.num_layers * block_size * s.num_kv_heads * s.head_dim * torch.tensor([], dtype=dtype).element_size()


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        store: AdapterStore,
        num_blocks: int,
        block_size: int,
        seed: int = 0,
        max_model_len: int = 4096,
        max_num_seqs: int = 64,
        enforce_eager: bool = True,
        max_num_batched_tokens: int | None = None,
        merge_switch: bool = False,
    ) -> None:
        """`max_num_batched_tokens`: with graphs on, also capture graphs for steps with prefill tokens up to this
        many tokens (None: decode graphs only). `merge_switch`: serve a dominant adapter merged (merge_switch.py)."""
        self.model = model
        self.store = store
        self.block_size = block_size
        self.num_blocks = num_blocks
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        s = model.shape
        # one extra block at the end: the scratch slot that padded rows of a CUDA graph write their K/V into
        self.kv_caches = [
            (
                torch.zeros(
                    num_blocks + 1, block_size, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=self.device
                ),
                torch.zeros(
                    num_blocks + 1, block_size, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=self.device
                ),
            )
            for _ in range(s.num_layers)
        ]
        self.sampler = Sampler(self.device, seed)
        self.use_triton = triton_attention_available(self.device) and s.sliding_window is None
        self.table_width = -(-max_model_len // block_size) if self.use_triton else None
        # graph steps' block tables, kept on the device across steps (block_table.py); rows for twice the batch so
        # finished sequences' rows are reclaimed in sweeps, not every step
        self.device_tables = (
            DeviceBlockTables(2 * max_num_seqs, self.table_width, self.device) if self.table_width else None
        )
        # CUDA graphs by mode (graph_capture.MODES): decode steps (cuda_graph.CudaGraphRunner) and steps with
        # prefill tokens (cuda_graph.MixedGraphRunner); empty when running eagerly
        self.decode_graphs: dict = {}
        self.mixed_graphs: dict = {}
        self.merge_switch = MergeSwitch(model, store) if merge_switch else None
        # set by the engine while a plugin is attached (plugin.py): asked once per step with prefill tokens, after
        # the forward is queued, for what to read from the KV cache; it never changes how the forward runs
        self.prefill_observer: Callable[[ScheduledBatch, StepInputs], PrefillRecord | None] | None = None
        self.last_forward_seconds = 0.0
        self._copy_stream = None  # side stream for sampled-token copies to the host (async scheduling, CUDA only)
        if self.use_triton and not enforce_eager:
            capture_graphs(self, max_num_seqs, max_num_batched_tokens)

    graph_runner = property(lambda self: self.decode_graphs.get("base"))
    graph_runner_lora = property(lambda self: self.decode_graphs.get("lora"))
    mixed_runner = property(lambda self: self.mixed_graphs.get("base"))
    mixed_runner_lora = property(lambda self: self.mixed_graphs.get("lora"))

    def prepare(
        self, batch: ScheduledBatch, pending: SampledTokens | None = None, non_blocking: bool = False
    ) -> StepInputs:
        """The step's inputs; with merge switching, the step's mode is settled first (a merge or unmerge happens
        here, between steps: the previous step was queued with the weights it was planned with)."""
        merged_slot = self.merge_switch.plan(batch) if self.merge_switch is not None else None
        graph_decode = self.graph_runner is not None and all(n == 1 for n in batch.num_tokens)
        # graphs need the static width (eager steps do not): decode graphs, and mixed ones when captured
        width = self.table_width if graph_decode or self.mixed_runner is not None else None
        return StepInputs(
            batch.seqs,
            batch.num_tokens,
            self.block_size,
            self.device,
            width,
            self.use_triton,
            pending,
            non_blocking,
            self.device_tables,
            merged_slot,
        )

    def _mode(self, inp: StepInputs) -> str:
        if inp.merged_slot is not None:
            return "merged_lora" if inp.has_lora or inp.needs_neg else "merged"
        return "lora" if inp.has_lora else "base"

    def _forward(self, inp: StepInputs) -> torch.Tensor:
        """Hidden states of the sampled rows [N, H]."""
        if inp.has_lora:
            self.store.wait_ready([s for s in inp.seg_slot_list if s >= 0])
        mode = self._mode(inp)
        graph = self.decode_graphs.get(mode)
        if graph is not None and inp.is_decode and graph.size_for(inp.num_seqs) is not None:
            return graph(inp.graph_inputs(), inp.num_seqs)  # decode: every row samples, in order
        mixed = self.mixed_graphs.get(mode)
        if mixed is not None and not inp.is_decode:
            total = inp.input_ids.shape[0]
            key = mixed.key_for(total, inp.num_seqs, inp.max_q_len)
            if key is not None:
                return mixed(inp.graph_inputs(), key, total)[inp.sample_rows]
        return self._eager_forward(inp, mode)

    def _eager_forward(self, inp: StepInputs, mode: str) -> torch.Tensor:
        if self.use_triton:
            attn = TritonPagedAttentionContext(
                self.kv_caches,
                inp.slot_mapping,
                inp.block_tables,
                inp.seq_lens,
                inp.q_indptr,
                inp.max_q_len,
                self.model.attn_scale,
            )
        else:
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
        if mode == "lora":
            lora = SegmentLoRAContext(self.store, inp.seg_indptr, inp.seg_slots)
        elif self.merge_switch is not None and mode in ("merged", "merged_lora"):
            lora = self.merge_switch.weights.context(
                inp.seg_indptr, inp.seg_slots, inp.neg_indptr, inp.neg_slots, inp.has_lora, inp.needs_neg
            )
        return self.model(inp.input_ids, inp.positions, attn, lora, None)[inp.sample_rows]

    def _record(self, batch: ScheduledBatch, inp: StepInputs) -> None:
        if self.prefill_observer is not None and not inp.is_decode:
            record = self.prefill_observer(batch, inp)
            if record is not None:
                record(self.kv_caches, inp.slot_mapping)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> dict[Sequence, int]:
        """Runs one step; returns the sampled token of every sequence whose chunk reached its last token."""
        t0 = time.perf_counter()
        inp = self.prepare(batch)
        hidden = self._forward(inp)
        self._record(batch, inp)
        out: dict[Sequence, int] = {}
        if inp.sample_seqs:
            logits = self.model.compute_logits(hidden)
            seqs = inp.sample_seqs
            histories = None
            if any(s.params.has_penalties for s in seqs):
                histories = [(s.token_ids[: s.num_prompt_tokens], s.output_token_ids) for s in seqs]
            tokens = self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs], histories)
            out = dict(zip(inp.sample_seqs, tokens, strict=True))
        self.last_forward_seconds = time.perf_counter() - t0
        return out

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, pending: SampledTokens | None = None) -> SampledTokens:
        """Queues one step without waiting for it: PLACEHOLDER inputs are read from `pending` (the previous step,
        possibly still running) on the device, and the sampled tokens come back as `SampledTokens`."""
        t0 = time.perf_counter()
        cuda = self.device.type == "cuda"
        inp = self.prepare(batch, pending, non_blocking=cuda)
        hidden = self._forward(inp)
        self._record(batch, inp)
        tokens = None
        seqs = inp.sample_seqs
        if seqs:
            logits = self.model.compute_logits(hidden)
            histories = None
            if any(s.params.has_penalties for s in seqs):
                histories = [(s.token_ids[: s.num_prompt_tokens], s.output_token_ids) for s in seqs]
            params, gens = [s.params for s in seqs], [s.generator for s in seqs]
            tokens = self.sampler.sample(logits, params, gens, histories, non_blocking=cuda)
        if cuda and self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=self.device)
        out = SampledTokens(seqs, tokens, self._copy_stream)
        self.last_forward_seconds = time.perf_counter() - t0
        return out

    @torch.inference_mode()
    def logits_for(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """Like `execute` but returns the raw logits (tests compare them with transformers + peft)."""
        inp = self.prepare(batch)
        hidden = self._forward(inp)
        return inp.sample_seqs, self.model.compute_logits(hidden)
