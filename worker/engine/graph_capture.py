"""Captures the model runner's CUDA graphs: decode and mixed (prefill) steps, without LoRA, with every slot's LoRA,
and, with merge switching on, over the merged copy (lora/merged.py) with and without the other adapters' passes.

Why each set: a graph bakes in which kernels run and which tensors they read. A step without adapters skips every
LoRA kernel; one with adapters runs them over all slots (`always`, padded rows have slot -1). A merged step reads
the merged copy's buffers (fixed addresses, so a new merge only rewrites their contents); when every row belongs to
the merged adapter it runs no LoRA kernel at all, which is what merging buys, else it runs the own-adapter pass and
the pass that subtracts the merged delta (`neg_indptr`/`neg_slots`, three and two entries whatever the batch).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
from lorafleet.worker.layers.attention import TritonPagedAttentionContext
from lorafleet.worker.layers.lora_context import SegmentLoRAContext

if TYPE_CHECKING:
    from lorafleet.worker.engine.model_runner import ModelRunner

log = logging.getLogger(__name__)
MODES = ("base", "lora", "merged", "merged_lora")


def graph_forward(runner: ModelRunner, inputs: dict[str, torch.Tensor], mode: str, max_q_len: int = 1):
    attn = TritonPagedAttentionContext(
        runner.kv_caches,
        inputs["slot_mapping"],
        inputs["block_tables"],
        inputs["seq_lens"],
        inputs["q_indptr"],
        max_q_len,
        runner.model.attn_scale,
    )
    lora = None
    if mode == "lora":
        lora = SegmentLoRAContext(runner.store, inputs["seg_indptr"], inputs["seg_slots"], always=True)
    elif mode in ("merged", "merged_lora"):
        both = mode == "merged_lora"
        lora = runner.merge_switch.weights.context(  # type: ignore[union-attr]
            inputs["seg_indptr"],
            inputs["seg_slots"],
            inputs.get("neg_indptr"),
            inputs.get("neg_slots"),
            both,
            both,
            True,
        )
    return runner.model(inputs["input_ids"], inputs["positions"], attn, lora)


def capture_graphs(runner: ModelRunner, max_num_seqs: int, max_tokens: int | None = None) -> None:
    """Captures decode graphs for batch sizes up to max_num_seqs (pads to the next captured size), and graphs
    for steps with prefill tokens up to `max_tokens` tokens (cuda_graph.MixedGraphRunner), for each mode."""
    from lorafleet.worker.engine.cuda_graph import (
        EDGE,
        CudaGraphRunner,
        InputSpec,
        MixedGraphRunner,
        default_sizes,
        mixed_buckets,
    )
    from lorafleet.worker.lora import dispatch, ops

    if dispatch.ops_for(runner.device) is ops:
        log.warning("CUDA graphs disabled: the Triton LoRA kernels are unavailable")
        return
    scratch = runner.num_blocks * runner.block_size
    specs = [
        InputSpec("input_ids"),
        InputSpec("positions"),
        InputSpec("slot_mapping", pad=scratch),
        InputSpec("block_tables"),
        InputSpec("seq_lens", pad=0),
        InputSpec("q_indptr", extra=1, pad=EDGE),
        InputSpec("seg_indptr", extra=1, pad=EDGE),
        InputSpec("seg_slots", pad=-1),
        InputSpec("neg_indptr"),  # fixed size: never padded
        InputSpec("neg_slots"),
    ]
    dev = runner.device
    width = runner.table_width or 1
    modes = MODES if runner.merge_switch is not None else MODES[:2]

    def example(bs: int, mode: str) -> dict[str, torch.Tensor]:
        ex = {
            "input_ids": torch.zeros(bs, dtype=torch.long, device=dev),
            "positions": torch.zeros(bs, dtype=torch.long, device=dev),
            "slot_mapping": torch.full((bs,), scratch, dtype=torch.long, device=dev),
            "block_tables": torch.zeros(bs, width, dtype=torch.int32, device=dev),
            "seq_lens": torch.zeros(bs, dtype=torch.int32, device=dev),
            "q_indptr": torch.arange(bs + 1, dtype=torch.int32, device=dev),
            "seg_indptr": torch.arange(bs + 1, dtype=torch.int32, device=dev),
            "seg_slots": torch.full((bs,), -1, dtype=torch.int32, device=dev),
        }
        if mode == "merged_lora":
            ex["neg_indptr"] = torch.zeros(3, dtype=torch.int32, device=dev)
            ex["neg_slots"] = torch.full((2,), -1, dtype=torch.int32, device=dev)
        return ex

    t0 = time.perf_counter()
    sizes = default_sizes(max_num_seqs)
    decode: dict[str, CudaGraphRunner] = {}
    with torch.inference_mode():
        for mode in modes:
            decode[mode] = CudaGraphRunner(
                lambda x, m=mode: graph_forward(runner, x, m), specs, sizes, lambda bs, m=mode: example(bs, m)
            )
    runner.decode_graphs = decode
    log.info(
        "captured decode CUDA graphs for %d batch sizes x %d modes in %.1f s",
        len(sizes),
        len(modes),
        time.perf_counter() - t0,
    )
    if not max_tokens:
        return

    def mixed_example(t: int, s: int, mode: str) -> dict[str, torch.Tensor]:
        ex = example(s, mode)  # sequence-axis inputs for s sequences ...
        ex["input_ids"] = torch.zeros(t, dtype=torch.long, device=dev)  # ... and token-axis ones for t tokens
        ex["positions"] = torch.zeros(t, dtype=torch.long, device=dev)
        ex["slot_mapping"] = torch.full((t,), scratch, dtype=torch.long, device=dev)
        ex["q_indptr"] = torch.zeros(s + 1, dtype=torch.int32, device=dev)  # no sequence has query tokens
        ex["seg_indptr"] = torch.zeros(s + 1, dtype=torch.int32, device=dev)
        return ex

    t0 = time.perf_counter()
    buckets = mixed_buckets(max_tokens)
    pool = decode["base"].pool
    mixed: dict[str, MixedGraphRunner] = {}
    with torch.inference_mode():
        for mode in modes:
            mixed[mode] = MixedGraphRunner(
                lambda x, q, m=mode: graph_forward(runner, x, m, q),
                specs,
                buckets,
                max_num_seqs,
                lambda t, s, m=mode: mixed_example(t, s, m),
                pool,
            )
    runner.mixed_graphs = mixed
    n = sum(len(q) for q in buckets.values())
    log.info("captured %d prefill/mixed CUDA graphs in %.1f s", len(modes) * n, time.perf_counter() - t0)
