"""Host cost of a graph step's block table: padded and copied whole every step vs rows kept on the device.

Why: a CUDA-graph step reads a [batch, max_model_len / block_size] table. `model_runner._pad_tables` rebuilds it
from the sequences' lists every step, so its cost follows `max_model_len`; `DeviceBlockTables` uploads only the ids
appended since the last step. This times `StepInputs` (everything a decode step builds on the host) both ways, for
128 decoding sequences of ~1k tokens, at context limits of 2k to 128k tokens; the device is the CPU, so what is
timed is host work (on a GPU the padded table is also a host-to-device copy of that size each step).

Usage: python -P bench/engine_block_table.py [--seqs 128] [--steps 200] [--out bench/results/engine_block_table.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from lorafleet.worker.engine.block_table import DeviceBlockTables
from lorafleet.worker.engine.model_runner import StepInputs
from lorafleet.worker.engine.sequence import SamplingParams, Sequence, SequenceStatus

BLOCK = 16


def _batch(n: int, context: int) -> list[Sequence]:
    seqs = []
    for i in range(n):
        s = Sequence(f"r{i}", list(range(context - 8 * i % 64)), SamplingParams(max_tokens=1 << 20))
        s.status = SequenceStatus.RUNNING
        s.num_computed_tokens = s.num_tokens - 1
        s.block_table = list(range(i * 4096, i * 4096 + -(-s.num_tokens // BLOCK)))
        seqs.append(s)
    return seqs


def _decode(seqs: list[Sequence]) -> None:
    """One token more for every sequence; a new block when it crosses a boundary (what a decode step does)."""
    for s in seqs:
        s.token_ids.append(7)
        s.num_computed_tokens += 1
        if s.num_tokens > len(s.block_table) * BLOCK:
            s.block_table.append(s.block_table[-1] + 1)


def measure(n: int, steps: int, max_model_len: int, persistent: bool) -> float:
    seqs = _batch(n, 1024)
    width = -(-max_model_len // BLOCK)
    tables = DeviceBlockTables(2 * n, width, torch.device("cpu")) if persistent else None
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        StepInputs(seqs, [1] * n, BLOCK, torch.device("cpu"), width, True, device_tables=tables)
        times.append(time.perf_counter() - t)
        _decode(seqs)
    return statistics.median(times[steps // 10 :]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="bench/results/engine_block_table.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, metrics = [], {}
    for max_len in (2048, 8192, 32768, 131072):
        padded = measure(args.seqs, args.steps, max_len, False)
        kept = measure(args.seqs, args.steps, max_len, True)
        rows.append({"max_model_len": max_len, "padded_ms": round(padded, 4), "device_rows_ms": round(kept, 4)})
        metrics[f"step_inputs_speedup_{max_len // 1024}k"] = round(padded / kept, 3)
        print(f"max_model_len {max_len:>6}: padded {padded:.3f} ms, device rows {kept:.3f} ms ({padded / kept:.2f}x)")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    result = {
        "command": " ".join(["python -P", *sys.argv]),
        "device": {"cpu": platform.processor() or platform.machine(), "threads": 1},
        "commit": commit.stdout.strip() or None,
        "note": "host time on CPU. The device-rows figure includes the step's gather of batch x width ids, which "
        "is a memcpy here (most of the 128k figure: 4 MB) and a device kernel on a GPU; the padded figure excludes "
        "the host-to-device copy of the padded table that a GPU step adds. Runs vary by ~2x at 32k.",
        "seqs": args.seqs,
        "context_tokens": "1024 - 8 * (i % 8)",
        "rows": rows,
        "metrics": metrics,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
