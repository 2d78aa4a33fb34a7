"""Does an SM partition (green context, worker/sm_partition.py) keep training kernels off serving's SMs?

1. Restriction: a large GEMM on a 16-SM partition stream, eagerly and as a CUDA graph (captured on the partition
   stream, and captured elsewhere then replayed on it), against the whole GPU.
2. Contention: a decode-like CUDA graph (Llama-3.2-1B GEMM shapes, batch 64, 16 layers + head) served on a
   highest-priority stream from a host loop with a fixed host gap, while training-like GEMM graphs (1024 tokens)
   keep a lowest-priority stream busy: unpartitioned, and on partitions leaving k SMs free. Reports serving step
   latency (mean, p99) and training GEMM throughput, each against running alone.

`python bench/gpu_sm_partition.py --out bench/results` (GPU machine; the checkout is not installed there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from lorafleet.worker.sm_partition import sm_partition

ROOT = Path(__file__).resolve().parent.parent

DEV = torch.device("cuda", 0)
BF = dict(dtype=torch.bfloat16, device=DEV)


def _time(fn, stream, reps=10) -> float:
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(stream)
    with torch.cuda.stream(stream):
        for _ in range(reps):
            fn()
    b.record(stream)
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def restriction() -> dict:
    x, w = torch.randn(8192, 8192, **BF), torch.randn(8192, 8192, **BF)
    out = torch.empty(8192, 8192, **BF)
    normal = torch.cuda.Stream()
    part = sm_partition(DEV, 16).stream
    res = {"full_ms": _time(lambda: torch.mm(x, w, out=out), normal)}
    res["part16_eager_ms"] = _time(lambda: torch.mm(x, w, out=out), part)
    g1 = torch.cuda.CUDAGraph()
    with torch.cuda.stream(part):
        torch.mm(x, w, out=out)
    with torch.cuda.graph(g1, stream=part):
        torch.mm(x, w, out=out)
    res["part16_graph_captured_on_part_ms"] = _time(g1.replay, part)
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2, stream=normal):
        torch.mm(x, w, out=out)
    res["part16_graph_captured_elsewhere_ms"] = _time(g2.replay, part)
    res["full_graph_ms"] = _time(g2.replay, normal)
    return res


def decode_graph(stream):
    h, inter, vocab, layers, b = 2048, 8192, 128256, 16, 64
    ws = [
        (
            torch.randn(h, 3072, **BF),
            torch.randn(h, h, **BF),
            torch.randn(h, 2 * inter, **BF),
            torch.randn(inter, h, **BF),
        )
        for _ in range(layers)
    ]
    head = torch.randn(h, vocab, **BF)
    x = torch.randn(b, h, **BF)

    def step():
        y = x
        for wqkv, wo, wgu, wd in ws:
            q = y @ wqkv
            y = y + q[:, :h] @ wo
            gu = y @ wgu
            y = y + torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:] @ wd
        return (y @ head).argmax(-1)

    with torch.cuda.stream(stream):
        step()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        step()
    g.keep = (ws, head, x)  # a graph does not own its inputs
    return g


def train_graph(stream):
    t, h, inter = 1024, 2048, 8192
    x = torch.randn(t, h, **BF)
    w1, w2 = torch.randn(h, inter, **BF), torch.randn(inter, h, **BF)

    def work():
        for _ in range(20):
            y = x @ w1
            _ = (y @ w2) @ w2.t()

    with torch.cuda.stream(stream):
        work()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        work()
    flops = 20 * 3 * 2 * t * h * inter
    g.keep = (x, w1, w2)
    return g, flops


def contention(host_gap_ms: float, steps: int, frees: list[int]) -> dict:
    lo, hi = torch.cuda.Stream.priority_range()
    serve = torch.cuda.Stream(priority=hi)
    sg = decode_graph(serve)
    total = torch.cuda.get_device_properties(0).multi_processor_count
    results: dict = {"total_sms": total, "host_gap_ms": host_gap_ms}

    def run(train_stream, tg=None) -> dict:
        lat, done_ev = [], []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n_train = 0
        for _ in range(steps):
            if tg is not None:
                while len(done_ev) - sum(e.query() for e in done_ev) < 2:
                    with torch.cuda.stream(train_stream):  # replay() launches on the current stream
                        tg.replay()
                    e = torch.cuda.Event()
                    e.record(train_stream)
                    done_ev.append(e)
                    n_train += 1
                done_ev = [e for e in done_ev if not e.query()]
            s = time.perf_counter()
            with torch.cuda.stream(serve):
                sg.replay()
            ev = torch.cuda.Event()
            ev.record(serve)
            ev.synchronize()
            lat.append((time.perf_counter() - s) * 1e3)
            end = time.perf_counter() + host_gap_ms / 1e3
            while time.perf_counter() < end:
                pass
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        lat.sort()
        return {
            "serve_ms_mean": statistics.fmean(lat),
            "serve_ms_p99": lat[int(0.99 * (len(lat) - 1))],
            "train_graphs_per_s": n_train / wall,
        }

    results["serve_alone"] = run(None)
    print("alone", results["serve_alone"], file=sys.stderr, flush=True)
    # training alone: back-to-back graphs on the full GPU
    ts = torch.cuda.Stream(priority=lo)
    tg, flops = train_graph(ts)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.cuda.stream(ts):
        for _ in range(50):
            tg.replay()
    torch.cuda.synchronize()
    alone = 50 / (time.perf_counter() - t0)
    results["train_alone_graphs_per_s"] = alone
    results["train_alone_tflops"] = alone * flops / 1e12
    r = run(ts, tg)
    r["train_retention"] = r["train_graphs_per_s"] / alone
    results["unpartitioned_low_priority"] = r
    print("unpartitioned", r, file=sys.stderr, flush=True)
    for free in frees:
        part = sm_partition(DEV, total - free)
        tgp, _ = train_graph(part.stream)
        r = run(part.stream, tgp)
        r["train_retention"] = r["train_graphs_per_s"] / alone
        r["train_sms"] = part.sms
        results[f"free_{free}"] = r
        print(free, r, file=sys.stderr, flush=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    import ctypes

    v = ctypes.c_int()
    ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v))
    res = {
        "command": "python bench/gpu_sm_partition.py " + " ".join(sys.argv[1:]),
        "device": {
            "name": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "driver_cuda": v.value,
        },
    }
    res["restriction"] = restriction()
    print(json.dumps(res, indent=1), flush=True)
    for gap in (1.0, 3.0):
        res[f"contention_gap_{gap}"] = contention(gap, args.steps, [8, 16, 24, 32, 48])
        print(json.dumps(res[f"contention_gap_{gap}"], indent=1), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_sm_partition.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
