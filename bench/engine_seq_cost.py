"""What one more running sequence costs a decode step, split into GPU kernel time and the rest (host), on the GPU.

Why (issue 5, `docs/coserving.md`): by Little's law a co-serving or time-slicing pause grows the batch, and TPOT
grows by about the pause share / (1 - arrival rate x request length x B), where B is this marginal cost per
running sequence. On the 1B shape B was ~30 us on an H200, which made a 10% pause cost 21-29% TPOT. Cutting B is
the lever for co-serving retention at that shape, and this says whether the host (input building, token
bookkeeping, detokenization) or the kernels (LoRA segments, paged attention, sampling) own it.

For each batch size N: N requests of the bench's prompt length decode together (CUDA graphs as served); the wall
time of `engine.step()` and, under the profiler, the summed kernel time per step. The slopes over N are B_wall and
B_gpu. `python bench/engine_seq_cost.py --out DIR` (GPU); CPU smoke: `--device cpu --tiny`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cl_gpu


def _slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def _kernel_seconds(prof, gpu: bool) -> float:
    if gpu:  # device time of the kernels only (graph replays included)
        return sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA") / 1e6
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("aten::")) / 1e6


def measure(engine, cfg, n: int, steps: int, gpu: bool) -> dict:
    from lorafleet.worker.engine.sequence import SamplingParams
    from torch.profiler import ProfilerActivity, profile

    vocab = min(engine.model.shape.vocab_size, 30000)
    params = SamplingParams(temperature=0.0, max_tokens=4 * steps + 64, ignore_eos=True)
    ids = [f"n{n}-{i}" for i in range(n)]
    for i, rid in enumerate(ids):
        engine.add_request(rid, [(i * 7919 + j * 104729) % (vocab - 10) + 10 for j in range(cfg.inf_prompt)], params)
    while engine.scheduler.waiting or any(s.num_output_tokens == 0 for s in engine.scheduler.running):
        engine.step()
    for _ in range(5):
        engine.step()
    wall = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        wall.append(time.perf_counter() - t0)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            engine.step()
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    wall.sort()
    return {
        "seqs": n,
        "step_ms_p50": 1e3 * wall[len(wall) // 2],
        "kernel_ms_per_step": 1e3 * _kernel_seconds(prof, gpu) / steps,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--out-name", default="engine_seq_cost.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--shape", default="1b", choices=tuple(cl_gpu.SHAPES))
    ap.add_argument("--batches", default="8,32,64,96,128")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-triton-elementwise", action="store_true", help="torch RMSNorm/rotary/SiLU (an A/B)")
    ap.add_argument("--async-scheduling", action="store_true", help="host work of step N-1 overlaps step N")
    args = ap.parse_args()
    cfg = cl_gpu.Cfg(args.tiny, args.device, args.shape)
    cfg.triton_elementwise = not args.no_triton_elementwise
    cfg.async_scheduling = args.async_scheduling
    engine, _ = cl_gpu.setup(cfg, Path(tempfile.mkdtemp(prefix="seq-cost-")))
    gpu = args.device.startswith("cuda")
    rows = [measure(engine, cfg, int(n), args.steps, gpu) for n in args.batches.split(",")]
    ns = [r["seqs"] for r in rows]
    walls = [r["step_ms_p50"] for r in rows]
    kernels = [r["kernel_ms_per_step"] for r in rows]
    res = {
        "command": "python bench/engine_seq_cost.py " + " ".join(sys.argv[1:]),
        "device": cl_gpu._device(args.device),
        "commit": cl_gpu.commit(),
        "triton_elementwise": cfg.triton_elementwise,
        "async_scheduling": cfg.async_scheduling,
        "rows": rows,
        "metrics": {
            "step_us_per_running_seq": 1e3 * _slope(ns, walls),
            "kernel_us_per_running_seq": 1e3 * _slope(ns, kernels),
            "rest_us_per_running_seq": 1e3 * (_slope(ns, walls) - _slope(ns, kernels)),
        },
    }
    print(json.dumps(res["metrics"], indent=1))
    for r in rows:
        print(r)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / args.out_name).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
