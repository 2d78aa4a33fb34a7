"""The flat inputs of one forward (`StepInputs`) and the tokens a launched step sampled (`SampledTokens`).

Why sort by adapter slot: the batched-LoRA ops want each adapter's tokens contiguous (Punica segments), so the
batch is stably reordered by slot, `seg_indptr`/`seg_slots` are built from the runs, and results are mapped back.
In a merged step (`lora/merged.py`) the merged adapter's rows sort first and its segment gets no LoRA pass of its
own, so every other row is one contiguous segment for the pass that subtracts the merged adapter's delta.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from lorafleet.worker.engine.block_table import DeviceBlockTables
from lorafleet.worker.engine.sampler import to_device
from lorafleet.worker.engine.sequence import Sequence

PLACEHOLDER = -1  # host stand-in for a token sampled by a step whose result is still on the device
MERGED_FIRST = -2  # sort key of the merged adapter's rows: ahead of rows without an adapter (-1)


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
        merged_slot: int | None = None,
    ) -> None:
        """`pending`: the step still in flight; a decode whose input is a PLACEHOLDER takes its token from there.
        `non_blocking`: upload through pinned memory without waiting for the queue (async scheduling).
        `device_tables`: with `table_width`, the step's table is gathered from rows kept on the device (only new
        block ids are uploaded) instead of being padded and copied whole.
        `merged_slot`: the slot of the adapter served merged this step: its rows sort first, its segment's slot
        is -1 in `seg_slots`, and `neg_indptr`/`neg_slots` ([0, merged rows, T] / [-1, merged_slot]) give the rest
        of the rows one segment on the merged slot, for the pass that subtracts its delta."""
        slots = [s.slot for s in seqs]  # a property over the adapter: read once per sequence
        keys = slots if merged_slot is None else [MERGED_FIRST if s == merged_slot else s for s in slots]
        order = sorted(range(len(seqs)), key=keys.__getitem__)
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
        self.merged_slot = merged_slot
        neg: list[int] = []
        self.num_unmerged_rows = total  # rows outside the merged adapter's segment
        if merged_slot is not None:
            if seg_slots[0] == merged_slot:
                self.num_unmerged_rows = total - seg_indptr[1]
                seg_slots[0] = -1
            neg = [0, total - self.num_unmerged_rows, total, -1, merged_slot]
        ints = to_device(
            _host_tensor(seq_lens + q_indptr + seg_indptr + seg_slots + neg, np.int32), device, non_blocking
        )
        self.seq_lens, self.q_indptr, self.seg_indptr, self.seg_slots, neg_t = ints.split(
            [nseq, nseq + 1, nseg + 1, nseg, len(neg)]
        )
        self.neg_indptr, self.neg_slots = (neg_t[:3], neg_t[3:]) if neg else (None, None)
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
        """Any row runs a LoRA pass of its own adapter (in a merged step: an adapter other than the merged one)."""
        return any(s >= 0 for s in self.seg_slot_list)

    @property
    def needs_neg(self) -> bool:
        """A merged step with rows outside the merged adapter: they subtract its delta."""
        return self.merged_slot is not None and self.num_unmerged_rows > 0

    def graph_inputs(self) -> dict[str, torch.Tensor]:
        extra = {} if self.neg_indptr is None else {"neg_indptr": self.neg_indptr, "neg_slots": self.neg_slots}
        return {
            **extra,
            "input_ids": self.input_ids,
            "positions": self.positions,
            "slot_mapping": self.slot_mapping,
            "block_tables": self.block_tables,
            "seq_lens": self.seq_lens,
            "q_indptr": self.q_indptr,
            "seg_indptr": self.seg_indptr,
            "seg_slots": self.seg_slots,
        }
