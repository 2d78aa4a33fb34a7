"""Block tables that stay on the device across steps (vLLM V1's persistent block table), for graph steps.

Why: a CUDA-graph step's attention reads a [batch, max_model_len / block_size] table. Rebuilt from the sequences'
lists every step, it costs host time and a host-to-device copy that grow with `max_model_len`, not with what the
sequences hold: at 128 sequences ~0.09 ms for a 2k context, ~0.37 ms for 32k, ~0.71 ms and a 4 MB copy for 128k
(CPU, numpy; bench/engine_block_table.py). Here every scheduled sequence owns a row of a device table; a step
uploads only the block ids appended since that sequence's last step (a decoding sequence gains one every
`block_size` tokens), and the step's table is one device gather of its rows.

Change detection relies on the block manager's invariant: a sequence's `block_table` list only grows (append),
and `BlockManager.free` replaces it with a new list. A row therefore remembers the list object it mirrors and how
many of its ids are on the device; another list object means "upload it all again". A row's stale tail is zeroed,
so the gathered table equals the zero-padded one that `model_runner._pad_tables` builds.
"""

from __future__ import annotations

import numpy as np
import torch
from lorafleet.worker.engine.sampler import to_device
from lorafleet.worker.engine.sequence import Sequence, SequenceStatus


class _Row:
    __slots__ = ("index", "mirrors", "synced", "written")

    def __init__(self, index: int, written: int) -> None:
        self.index = index
        self.mirrors: list[int] | None = None  # the sequence's block_table list this row holds
        self.synced = 0  # ids of `mirrors` on the device
        self.written = written  # entries of the device row that may be non-zero


class DeviceBlockTables:
    """Rows of block ids on the device, one per recently scheduled sequence; `gather` gives a step's table."""

    def __init__(self, rows: int, width: int, device: torch.device, dtype: torch.dtype = torch.int32) -> None:
        self.width = width
        self.device = device
        self.table = torch.zeros(rows, width, dtype=dtype, device=device)
        self._np_dtype = np.int32 if dtype == torch.int32 else np.int64
        self._free = list(range(rows - 1, -1, -1))
        self._written = [0] * rows  # per free row: entries its last owner left non-zero
        self._rows: dict[Sequence, _Row] = {}
        self.uploaded_ids = 0  # block ids sent to the device (tests, benchmarks)

    def gather(self, seqs: list[Sequence], non_blocking: bool = False) -> torch.Tensor:
        """[len(seqs), width] table of `seqs` in this order, after uploading what changed since their last step."""
        flat: list[int] = []  # row * width + column of each changed entry
        vals: list[int] = []
        rows: list[int] = []
        width = self.width
        for seq in seqs:
            row = self._rows.get(seq)
            if row is None:
                row = self._rows[seq] = self._take_row(seqs)
            bt = seq.block_table
            if row.mirrors is not bt:  # first step, or its blocks were freed and allocated again
                row.mirrors, row.synced = bt, 0
            n = len(bt)
            if n > width:
                raise ValueError(f"sequence {seq.request_id} holds {n} blocks; the table is {width} wide")
            base = row.index * width
            if n > row.synced:
                flat += range(base + row.synced, base + n)
                vals += bt[row.synced : n]
            if row.written > n and row.synced == 0:  # a stale tail from an earlier owner or list: zero it
                flat += range(base + n, base + row.written)
                vals += [0] * (row.written - n)
                row.written = n
            row.synced = n
            row.written = max(row.written, n)
            rows.append(row.index)
        if flat:
            idx = to_device(torch.from_numpy(np.array(flat, dtype=np.int64)), self.device, non_blocking)
            src = to_device(torch.from_numpy(np.array(vals, dtype=self._np_dtype)), self.device, non_blocking)
            self.table.view(-1).index_copy_(0, idx, src)
            self.uploaded_ids += len(flat)
        row_ids = to_device(torch.from_numpy(np.array(rows, dtype=np.int64)), self.device, non_blocking)
        return self.table.index_select(0, row_ids)

    def _take_row(self, current: list[Sequence]) -> _Row:
        if not self._free:
            self._sweep(set(current))
        index = self._free.pop()
        return _Row(index, self._written[index])

    def _sweep(self, keep: set[Sequence]) -> None:
        """Frees the rows of sequences that are not in this step: finished ones first; if none has finished, every
        one not scheduled now (a sequence that comes back later is uploaded again)."""
        idle = [s for s in self._rows if s not in keep]
        done = [s for s in idle if s.status == SequenceStatus.FINISHED]
        for seq in done or idle:
            row = self._rows.pop(seq)
            self._written[row.index] = row.written
            self._free.append(row.index)
        if not self._free:
            raise RuntimeError("more sequences in one step than block-table rows")
