"""Why do serving steps slow down under time-slicing? (issue 5: the `coserve_vs_timeslice` baseline.)

Under time-slicing, serving steps run ~45% slower while the loop trains only ~2% of the time. Two explanations
predict different things:
- queueing: any pause lets requests pile up, the next steps carry more sequences and run longer; a *sleep* of the
  same length as the training piece slows serving just as much, and steps of equal batch cost the same;
- the GPU: a training piece leaves the device slower for the serving steps after it (clocks, caches, allocator);
  then steps of equal batch are slower after training than after a sleep.
At each load this runs inference alone, time-slicing that trains on every k-th of 64 fine-tuning iterations, and
the same loop sleeping as long as a training piece took instead, on the same arrivals; it reports each run's
TPOT and the forward time of decode-only steps binned by batch size.

`python bench/cl_timeslice_check.py --out DIR` on the GPU machine; CPU smoke: `--device cpu --tiny`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cl_gpu


def binned(steps: list[tuple[int, int, int, float]], width: int) -> dict[str, dict]:
    """Median forward seconds of decode-only steps per batch-size bin (same batch, same work: equal if the GPU is)."""
    bins: dict[int, list[float]] = {}
    for seqs, prefill, _, fwd in steps:
        if prefill == 0 and seqs:
            bins.setdefault(seqs // width * width, []).append(fwd)
    out = {}
    for lo in sorted(bins):
        v = sorted(bins[lo])
        out[f"{lo}-{lo + width - 1}"] = {"steps": len(v), "forward_ms_p50": 1e3 * v[len(v) // 2]}
    return out


def summary(r: dict, target_s: float | None, width: int) -> dict:
    tpot = r["tpot"]
    return {
        "elapsed_s": r["elapsed_s"],
        "iterations": r["iterations"],
        "train_seconds": r["train_seconds"],
        "ft_tokens_per_s": r["ft_tokens_per_s"],
        "tpot_p50": cl_gpu.pct(tpot, 0.5),
        "tpot_p99": cl_gpu.pct(tpot, 0.99),
        "ttft_p50": cl_gpu.pct(r["ttft"], 0.5),
        "attainment": None if target_s is None else cl_gpu.attainment(tpot, target_s),
        "step_seconds_mean": r["step_seconds_mean"],
        "gc_seconds": r["gc_seconds"],
        "step_mix": r["step_mix"],
        "decode_forward_by_batch": binned(r["steps"], width),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--out-name", default="cl_timeslice_check.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--every", type=int, default=16, help="train on every k-th of 64 fine-tuning iterations")
    ap.add_argument("--loads", default="0.5,0.9")
    args = ap.parse_args()
    cfg = cl_gpu.Cfg(args.tiny, args.device)
    cfg.duration = args.duration
    width = 2 if args.tiny else 8
    Path(args.out).mkdir(parents=True, exist_ok=True)  # the JSON is rewritten after each load
    t_all = time.perf_counter()
    engine, root = cl_gpu.setup(cfg, Path(tempfile.mkdtemp(prefix="cl-ts-")))
    engine._bench_stash_bytes = cfg.stash_bytes
    from lorafleet.worker.gpu import prioritise_serving_stream

    prioritise_serving_stream(engine.device)
    from lorafleet.worker.main import freeze_startup_heap

    freeze_startup_heap()  # as `lorafleet worker` does once the engine is built
    res: dict = {
        "command": "python bench/cl_timeslice_check.py " + " ".join(sys.argv[1:]),
        "device": cl_gpu._device(args.device),
        "commit": cl_gpu.commit(),
        "every": args.every,
    }
    cl_gpu.run_load(engine, cfg, None, seed=1)  # warm-up
    r_max = cl_gpu.run_load(engine, cfg, None, seed=2)["req_per_s"]
    res["max_load_req_per_s"] = r_max
    job = cl_gpu.make_job(engine, root, "ft", record=False)
    cl_gpu.feed(job, cfg, 256, seed=5)
    cl_gpu.finetune_alone(engine, job, cfg)  # captures the training graphs before any timed run
    for load in (float(x) for x in args.loads.split(",")):
        rate, seed = load * r_max, 20 + int(load * 10)
        alone = cl_gpu.run_load(engine, cfg, rate, seed=seed)
        target = 1.10 * cl_gpu.pct(alone["tpot"], 0.99)
        ts = cl_gpu.run_load(engine, cfg, rate, seed=seed, job=job, mode="timeslice", slice_every=args.every)
        pause = ts["train_seconds"] / max(1, ts["timeslice_pieces"])
        slept = cl_gpu.run_load(engine, cfg, rate, seed=seed, mode="timeslice", slice_every=args.every, pause_s=pause)
        after = cl_gpu.run_load(engine, cfg, rate, seed=seed)  # alone again: does the GPU stay slower?
        res[f"{int(load * 100)}"] = {
            "rate": rate,
            "tpot_target_s": target,
            "piece_seconds_mean": pause,
            "alone": summary(alone, target, width),
            "timeslice_train": summary(ts, target, width),
            "timeslice_sleep": summary(slept, target, width),
            "alone_after": summary(after, target, width),
        }
        (Path(args.out) / args.out_name).write_text(json.dumps(res, indent=1))
    res["total_s"] = time.perf_counter() - t_all
    (Path(args.out) / args.out_name).write_text(json.dumps(res, indent=1))
    for k in ("50", "90"):
        if k in res:
            for name in ("alone", "timeslice_train", "timeslice_sleep", "alone_after"):
                x = res[k][name]
                print(
                    k,
                    name,
                    {kk: x[kk] for kk in ("tpot_p50", "tpot_p99", "attainment", "step_seconds_mean", "gc_seconds")},
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
