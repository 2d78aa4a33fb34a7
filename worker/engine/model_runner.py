"""Turns a scheduled batch into flat model inputs, runs the forward over the paged KV cache, and samples.

Why sort by adapter slot: the batched-LoRA ops want each adapter's tokens contiguous (Punica segments), so the
batch is stably reordered by slot, `seg_indptr`/`seg_slots` are built from the runs, and results are mapped back.
On CUDA the attention is the Triton paged kernel (device tensors only) and decode-only batches replay CUDA graphs
(`cuda_graph.py`, one set with LoRA and one without); elsewhere the SDPA context serves every batch.
`launch` is the async-scheduling variant of `execute`: the sampled tokens stay on the device, the next step's
inputs take them from there (a placeholder id on the host), and their copy to the host runs on a side stream.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from lorafleet.worker.engine.block_table import DeviceBlockTables
from lorafleet.worker.engine.plugin import PrefillRecord
from lorafleet.worker.engine.sampler import Sampler, to_device
from lorafleet.worker.engine.scheduler import ScheduledBatch
from lorafleet.worker.engine.sequence import Sequence
from lorafleet.worker.layers.attention import (
    PagedAttentionContext,
    TritonPagedAttentionContext,
    triton_attention_available,
)
from lorafleet.worker.layers.lora_context import SegmentLoRAContext
from lorafleet.worker.lora.store import AdapterStore
from lorafleet.worker.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)
PLACEHOLDER = -1  # host stand-in for a token sampled by a step whose result is still on the device


def kv_block_bytes(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    s = model.shape
    return 2 * s.num_layers * block_size * s.num_kv_heads * s.head_dim * torch.tensor([], dtype=dtype).element_size()


def _pad_tables(tables: list[list[int]], width: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, width] block table, zero padded (CUDA graphs use width = max_model_len blocks).

    Built in numpy: `torch.tensor` of a Python list costs ~100 ns per element, and a 128-sequence step's tables hold
    a few thousand block ids, which made this ~0.45 ms of host time per step; `np.fromiter` over the chained lists
    and one masked store take ~0.1 ms (`tests/worker/test_engine.py::test_pad_tables_equals_row_by_row_padding`)."""
    np_dtype = np.int32 if dtype == torch.int32 else np.int64
    lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np_dtype, count=int(lens.sum()))
    out = np.zeros((len(tables), width), dtype=np_dtype)
    out[np.arange(width)[None, :] < lens[:, None]] = flat
    return torch.from_numpy(out)


def _host_tensor(values: list[int], np_dtype) -> torch.Tensor:
    """A host tensor from a Python int list through numpy (several times faster than `torch.tensor` on lists)."""
    return torch.from_numpy(np.array(values, dtype=np_dtype))


class SampledTokens:
    """The tokens one launched step sampled, one per `seqs` entry: on the device for the next step's inputs, and
    copied to pinned host memory on a side stream, so `tolist()` waits for that copy only, not for whatever was
    queued after it (the next step's forward)."""

    def __init__(self, seqs: list[Sequence], tokens: torch.Tensor | None, copy_stream=None) -> None:
        self.seqs = seqs
        self.tokens = tokens  # [len(seqs)] long on the device; None when no sequence sampled
        self.index = {s: i for i, s in enumerate(seqs)}
        self.needs_host = any(s.params.has_penalties for s in seqs)  # penalties read the previous tokens on host
        self._host: torch.Tensor | None = None
        self._event = None
        if tokens is not None and copy_stream is not None:
            copy_stream.wait_stream(torch.cuda.current_stream(tokens.device))
            with torch.cuda.stream(copy_stream):
                self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
                self._host.copy_(tokens, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record(copy_stream)
            tokens.record_stream(copy_stream)

    def tolist(self) -> list[int]:
        if self.tokens is None:
            return []
        if self._event is not None and self._host is not None:
            self._event.synchronize()
            return self._host.tolist()
        return self.tokens.tolist()


class StepInputs:
    """Flat tensors for one forward: tokens sorted by adapter, their positions, KV slots and LoRA segments.

    Why two packed host buffers: every per-step tensor is built from Python lists, and on CUDA each separate
    `torch.tensor(..., device=cuda)` is its own small copy; packing the int64 lists and the int32 lists into one
    tensor each (then taking views) makes it two copies plus the block table."""

    def __init__(
        self,
        seqs: list[Sequence],
        num_tokens: list[int],
        block_size: int,
        device: torch.device,
        table_width: int | None = None,
        int32_tables: bool = False,
        pending: SampledTokens | None = None,
        non_blocking: bool = False,
        device_tables: DeviceBlockTables | None = None,
    ) -> None:
        """`pending`: the step still in flight; a decode whose input is a PLACEHOLDER takes its token from there.
        `non_blocking`: upload through pinned memory without waiting for the queue (async scheduling).
        `device_tables`: with `table_width`, the step's table is gathered from rows kept on the device (only new
        block ids are uploaded) instead of being padded and copied whole."""
        slots = [s.slot for s in seqs]  # a property over the adapter: read once per sequence
        order = sorted(range(len(seqs)), key=slots.__getitem__)
        self.order = order
        bs = block_size
        ids: list[int] = []
        pos: list[int] = []
        slot_map: list[int] = []
        starts: list[int] = []
        qlens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []  # flat row of the last token of each sequence that samples this step
        self.sample_seqs: list[Sequence] = []
        seg_slots: list[int] = []
        seg_indptr = [0]
        q_indptr = [0]
        patch_rows: list[int] = []  # flat rows whose input id is read from `pending.tokens` on the device
        patch_src: list[int] = []
        total = 0
        for i in order:
            seq, n = seqs[i], num_tokens[i]
            start = seq.num_computed_tokens
            end = start + n
            bt = seq.block_table
            if n == 1:  # decode: no per-token loop
                tok = seq.token_ids[start]
                if tok < 0:  # PLACEHOLDER (async scheduling); `pending` is None here only on a bookkeeping bug
                    patch_rows.append(total)
                    patch_src.append(pending.index[seq])  # type: ignore[union-attr]
                ids.append(tok)
                pos.append(start)
                slot_map.append(bt[start // bs] * bs + start % bs)
            else:
                ids += seq.token_ids[start:end]
                pos += range(start, end)
                slot_map += [bt[p // bs] * bs + p % bs for p in range(start, end)]
            total += n
            starts.append(start)
            qlens.append(n)
            q_indptr.append(total)
            tables.append(bt)
            if end == len(seq.token_ids):
                sample_rows.append(total - 1)
                self.sample_seqs.append(seq)
            slot = slots[i]
            if seg_slots and seg_slots[-1] == slot:
                seg_indptr[-1] = total
            else:
                seg_slots.append(slot)
                seg_indptr.append(total)
        width = table_width or max(len(t) for t in tables)
        nseq, nseg, nsample = len(seqs), len(seg_slots), len(sample_rows)
        self.num_seqs = nseq
        npatch = len(patch_rows)
        longs = to_device(
            _host_tensor(ids + pos + slot_map + sample_rows + patch_rows + patch_src, np.int64), device, non_blocking
        )
        self.input_ids, self.positions, self.slot_mapping, self.sample_rows, rows, src = longs.split(
            [total, total, total, nsample, npatch, npatch]
        )
        if npatch:
            self.input_ids.index_copy_(0, rows, pending.tokens.index_select(0, src))  # type: ignore[union-attr]
        seq_lens = [s + n for s, n in zip(starts, qlens, strict=True)]
        ints = to_device(_host_tensor(seq_lens + q_indptr + seg_indptr + seg_slots, np.int32), device, non_blocking)
        self.seq_lens, self.q_indptr, self.seg_indptr, self.seg_slots = ints.split([nseq, nseq + 1, nseg + 1, nseg])
        if device_tables is not None and table_width is not None:
            self.block_tables = device_tables.gather([seqs[i] for i in order], non_blocking)
        else:
            tables_t = _pad_tables(tables, width, torch.int32 if int32_tables else torch.long)
            self.block_tables = to_device(tables_t, device, non_blocking)
        self.max_q_len = max(qlens)
        self.starts = starts
        self.query_lens = qlens
        self.seg_slot_list = seg_slots
        self.is_decode = total == nseq

    @property
    def has_lora(self) -> bool:
        return any(s >= 0 for s in self.seg_slot_list)

    def graph_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "positions": self.positions,
            "slot_mapping": self.slot_mapping,
            "block_tables": self.block_tables,
            "seq_lens": self.seq_lens,
            "q_indptr": self.q_indptr,
            "seg_indptr": self.seg_indptr,
            "seg_slots": self.seg_slots,
        }


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
    ) -> None:
        """`max_num_batched_tokens`: with graphs on, also capture graphs for steps with prefill tokens up to this
        many tokens (None: decode graphs only)."""
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
        self.graph_runner = None  # decode CUDA graphs without LoRA (cuda_graph.CudaGraphRunner)
        self.graph_runner_lora = None  # ... and with the batched-LoRA ops over every slot
        self.mixed_runner = None  # graphs for steps with prefill tokens (cuda_graph.MixedGraphRunner), no LoRA
        self.mixed_runner_lora = None
        # set by the engine while a plugin is attached (plugin.py): asked once per step with prefill tokens, after
        # the forward is queued, for what to read from the KV cache; it never changes how the forward runs
        self.prefill_observer: Callable[[ScheduledBatch, StepInputs], PrefillRecord | None] | None = None
        self.last_forward_seconds = 0.0
        self._copy_stream = None  # side stream for sampled-token copies to the host (async scheduling, CUDA only)
        if self.use_triton and not enforce_eager:
            self._capture_graphs(max_num_seqs, max_num_batched_tokens)

    def prepare(
        self, batch: ScheduledBatch, pending: SampledTokens | None = None, non_blocking: bool = False
    ) -> StepInputs:
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
        )

    def _graph_forward(self, inputs: dict[str, torch.Tensor], with_lora: bool, max_q_len: int = 1) -> torch.Tensor:
        attn = TritonPagedAttentionContext(
            self.kv_caches,
            inputs["slot_mapping"],
            inputs["block_tables"],
            inputs["seq_lens"],
            inputs["q_indptr"],
            max_q_len,
            self.model.attn_scale,
        )
        lora = (
            SegmentLoRAContext(self.store, inputs["seg_indptr"], inputs["seg_slots"], always=True)
            if with_lora
            else None
        )
        return self.model(inputs["input_ids"], inputs["positions"], attn, lora)

    def _capture_graphs(self, max_num_seqs: int, max_tokens: int | None = None) -> None:
        """Captures decode graphs for batch sizes up to max_num_seqs (pads to the next captured size), and graphs
        for steps with prefill tokens up to `max_tokens` tokens (cuda_graph.MixedGraphRunner)."""
        from lorafleet.worker.engine.cuda_graph import (
            EDGE,
            CudaGraphRunner,
            InputSpec,
            MixedGraphRunner,
            default_sizes,
            mixed_buckets,
        )
        from lorafleet.worker.lora import dispatch, ops

        if dispatch.ops_for(self.device) is ops:
            log.warning("CUDA graphs disabled: the Triton LoRA kernels are unavailable")
            return
        scratch = self.num_blocks * self.block_size
        specs = [
            InputSpec("input_ids"),
            InputSpec("positions"),
            InputSpec("slot_mapping", pad=scratch),
            InputSpec("block_tables"),
            InputSpec("seq_lens", pad=0),
            InputSpec("q_indptr", extra=1, pad=EDGE),
            InputSpec("seg_indptr", extra=1, pad=EDGE),
            InputSpec("seg_slots", pad=-1),
        ]
        dev = self.device
        width = self.table_width or 1

        def example(bs: int) -> dict[str, torch.Tensor]:
            return {
                "input_ids": torch.zeros(bs, dtype=torch.long, device=dev),
                "positions": torch.zeros(bs, dtype=torch.long, device=dev),
                "slot_mapping": torch.full((bs,), scratch, dtype=torch.long, device=dev),
                "block_tables": torch.zeros(bs, width, dtype=torch.int32, device=dev),
                "seq_lens": torch.zeros(bs, dtype=torch.int32, device=dev),
                "q_indptr": torch.arange(bs + 1, dtype=torch.int32, device=dev),
                "seg_indptr": torch.arange(bs + 1, dtype=torch.int32, device=dev),
                "seg_slots": torch.full((bs,), -1, dtype=torch.int32, device=dev),
            }

        t0 = time.perf_counter()
        sizes = default_sizes(max_num_seqs)
        with torch.inference_mode():
            self.graph_runner = CudaGraphRunner(lambda x: self._graph_forward(x, False), specs, sizes, example)
            self.graph_runner_lora = CudaGraphRunner(lambda x: self._graph_forward(x, True), specs, sizes, example)
        log.info("captured decode CUDA graphs for %d batch sizes in %.1f s", len(sizes), time.perf_counter() - t0)
        if not max_tokens:
            return

        def mixed_example(t: int, s: int) -> dict[str, torch.Tensor]:
            ex = example(s)  # sequence-axis inputs for s sequences ...
            ex["input_ids"] = torch.zeros(t, dtype=torch.long, device=dev)  # ... and token-axis ones for t tokens
            ex["positions"] = torch.zeros(t, dtype=torch.long, device=dev)
            ex["slot_mapping"] = torch.full((t,), scratch, dtype=torch.long, device=dev)
            ex["q_indptr"] = torch.zeros(s + 1, dtype=torch.int32, device=dev)  # no sequence has query tokens
            ex["seg_indptr"] = torch.zeros(s + 1, dtype=torch.int32, device=dev)
            return ex

        t0 = time.perf_counter()
        buckets = mixed_buckets(max_tokens)
        pool = self.graph_runner.pool
        with torch.inference_mode():
            self.mixed_runner = MixedGraphRunner(
                lambda x, q: self._graph_forward(x, False, q), specs, buckets, max_num_seqs, mixed_example, pool
            )
            self.mixed_runner_lora = MixedGraphRunner(
                lambda x, q: self._graph_forward(x, True, q), specs, buckets, max_num_seqs, mixed_example, pool
            )
        n = sum(len(q) for q in buckets.values())
        log.info("captured %d prefill/mixed CUDA graphs in %.1f s", 2 * n, time.perf_counter() - t0)

    def _forward(self, inp: StepInputs) -> torch.Tensor:
        """Hidden states of the sampled rows [N, H]."""
        if inp.has_lora:
            self.store.wait_ready([s for s in inp.seg_slot_list if s >= 0])
        graph = self.graph_runner_lora if inp.has_lora else self.graph_runner
        if graph is not None and inp.is_decode and graph.size_for(inp.num_seqs) is not None:
            return graph(inp.graph_inputs(), inp.num_seqs)  # decode: every row samples, in order
        mixed = self.mixed_runner_lora if inp.has_lora else self.mixed_runner
        if mixed is not None and not inp.is_decode:
            total = inp.input_ids.shape[0]
            key = mixed.key_for(total, inp.num_seqs, inp.max_q_len)
            if key is not None:
                return mixed(inp.graph_inputs(), key, total)[inp.sample_rows]
        return self._eager_forward(inp)

    def _eager_forward(self, inp: StepInputs) -> torch.Tensor:
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
        lora = SegmentLoRAContext(self.store, inp.seg_indptr, inp.seg_slots) if inp.has_lora else None
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
