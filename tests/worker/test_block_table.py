"""Block tables kept on the device across steps (worker/engine/block_table.py): every step's gathered table must
equal the zero-padded table built from the sequences' lists, through growth, freed-and-reallocated block lists,
finished sequences, row reuse and sweeps, while uploading only what changed."""

from __future__ import annotations

import random

import pytest
import torch
from lorafleet.worker.engine.block_table import DeviceBlockTables
from lorafleet.worker.engine.model_runner import StepInputs, _pad_tables
from lorafleet.worker.engine.sequence import SamplingParams, Sequence, SequenceStatus


def _seq(i: int) -> Sequence:
    return Sequence(f"r{i}", list(range(3)), SamplingParams(max_tokens=4))


@pytest.mark.parametrize("seed,steady", [(0, False), (1, False), (2, True), (3, True)])
def test_gathered_tables_equal_padded_tables_through_growth_frees_and_row_reuse(seed, steady):
    """Not `steady`: more live sequences than rows and random subsets scheduled, so rows are swept and re-uploaded
    all the time. `steady`: as the engine runs, at most half the rows live and every live sequence scheduled."""
    rng = random.Random(seed)
    width, rows = 24, 8
    dev = DeviceBlockTables(rows, width, torch.device("cpu"))
    seqs = [_seq(i) for i in range(40)]
    for s in seqs:
        s.status = SequenceStatus.WAITING
    fresh = 0
    total_entries = 0
    for _ in range(600):
        live = [s for s in seqs if s.status == SequenceStatus.RUNNING]
        for s in live:
            r = rng.random()
            if r < 0.3 and len(s.block_table) < width:
                s.block_table.append(rng.randrange(1, 10_000))  # a decode crossed a block boundary
            elif r < 0.33:
                s.block_table = []  # preempted: BlockManager.free replaces the list
                s.status = SequenceStatus.WAITING
            elif r < 0.36:
                s.status = SequenceStatus.FINISHED
        for s in rng.sample(seqs, 3):
            full = steady and sum(x.status == SequenceStatus.RUNNING for x in seqs) >= rows // 2
            if (
                s.status != SequenceStatus.RUNNING and rng.random() < 0.5 and not full
            ):  # (re)admitted: a fresh, refilled list
                s.block_table = [rng.randrange(1, 10_000) for _ in range(rng.randint(0, width))]
                s.status = SequenceStatus.RUNNING
                fresh += 1
        live = [s for s in seqs if s.status == SequenceStatus.RUNNING]
        batch = live if steady else rng.sample(live, min(len(live), rng.randint(1, rows)))
        got = dev.gather(batch)
        want = _pad_tables([s.block_table for s in batch], width, torch.int32)
        assert torch.equal(got, want)
        total_entries += sum(len(s.block_table) for s in batch)
    assert fresh > 50
    if steady:
        assert dev.uploaded_ids < total_entries / 5  # mostly what changed, not every id of every step


def test_step_inputs_gather_the_same_table_as_they_pad():
    seqs = [_seq(i) for i in range(5)]
    for i, s in enumerate(seqs):
        s.block_table = list(range(10 * i + 1, 10 * i + 2 + i))
        s.num_computed_tokens = 2
        s.status = SequenceStatus.RUNNING
    dev = DeviceBlockTables(8, 16, torch.device("cpu"))
    args = (seqs, [1] * 5, 4, torch.device("cpu"), 16, True)
    padded, gathered = StepInputs(*args), StepInputs(*args, device_tables=dev)
    assert torch.equal(padded.block_tables, gathered.block_tables) and gathered.block_tables.shape == (5, 16)
    assert torch.equal(padded.slot_mapping, gathered.slot_mapping)
    seqs[2].block_table.append(99)
    again = StepInputs(*args, device_tables=dev)
    assert torch.equal(again.block_tables, StepInputs(*args).block_tables) and dev.uploaded_ids == 15 + 1


def test_a_table_wider_than_the_rows_is_refused():
    dev = DeviceBlockTables(2, 4, torch.device("cpu"))
    s = _seq(0)
    s.block_table = list(range(5))
    with pytest.raises(ValueError, match="5 blocks"):
        dev.gather([s])
