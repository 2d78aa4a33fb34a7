"""What a fused co-serving ride costs a serving step (issue 5, `placement: fused`), on the GPU machine.

A fixed decode batch (`--seqs` requests of the bench's prompt length, long outputs) is stepped:
1. alone (rides off), 2. every step carrying the armed training rows (latency gate off; CUDA graphs as served),
3. the same under the profiler (kernels inside the graphs): kernel time of ride steps vs plain steps,
and the head / backward pieces' GPU time. `python bench/cl_fused_profile.py --out DIR`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cl_gpu  # noqa: E402  (import shim + model/job builders)
import torch  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _steps(engine, n: int) -> list[tuple[float, int, int]]:
    """(seconds, training rows carried, training pieces launched by its hook) of n engine steps, synchronized."""
    rider = engine.runner.rider
    out = []
    for _ in range(n):
        _sync()
        g0 = rider.graph_replays + rider.eager_runs if rider is not None else 0
        t0 = time.perf_counter()
        engine.step()
        _sync()
        dt = time.perf_counter() - t0
        if rider is None:
            out.append((dt, 0, 0))
        else:
            out.append((dt, int(rider.last_ride), rider.graph_replays + rider.eager_runs - g0))
    return out


def _summary(xs: list[tuple[float, int, int]]) -> dict:
    """Medians of steps that carried rows / did not, and of those whose hook launched no training piece."""

    def med(v):
        v = sorted(v)
        return _ms(v[len(v) // 2]) if v else None

    return {
        "ride_steps": sum(1 for _, r, _ in xs if r),
        "ride_ms_p50": med([t for t, r, _ in xs if r]),
        "ride_only_ms_p50": med([t for t, r, p in xs if r and not p]),
        "plain_steps": sum(1 for _, r, _ in xs if not r),
        "plain_ms_p50": med([t for t, r, _ in xs if not r]),
        "plain_only_ms_p50": med([t for t, r, p in xs if not r and not p]),
        "pieces": sum(p for _, _, p in xs),
    }


def _ms(x):
    return None if x is None else x * 1e3


def _table(prof, limit: int = 40) -> list[dict]:
    gpu = torch.cuda.is_available()
    rows = sorted(
        (
            (e.key, (e.device_time_total if gpu else e.self_cpu_time_total) / 1e3, e.count)
            for e in prof.key_averages()
            if (e.device_time_total if gpu else e.self_cpu_time_total) > 0
        ),
        key=lambda r: -r[1],
    )
    return [{"name": n[:120], "ms": ms, "count": c} for n, ms, c in rows[:limit]]


def main() -> int:
    from lorafleet.worker.engine.sequence import SamplingParams
    from lorafleet.worker.training.coserve import coserve_iteration

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: the tiny model")
    ap.add_argument("--shape", default="1b", choices=tuple(cl_gpu.SHAPES), help="model shape (as bench/cl_gpu.py)")
    ap.add_argument("--ride-rows", type=int, default=128, help="training rows per fused serving step")
    ap.add_argument(
        "--ride-lora",
        default="segments",
        choices=("segments", "own"),
        help="training rows' LoRA: a segment of the "
        "serving shrink/expand over a claimed slot, or the rider's own GEMMs (A/B)",
    )
    ap.add_argument("--out-name", default="cl_fused_profile.json")
    args = ap.parse_args()
    cfg = cl_gpu.Cfg(args.tiny, args.device, args.shape)
    work = Path(tempfile.mkdtemp())
    engine, root = cl_gpu.setup(cfg, work)
    engine._bench_train_stream = "fused"
    engine._bench_stash_bytes = cfg.stash_bytes
    engine._bench_ride_rows = args.ride_rows
    engine._bench_ride_lora = args.ride_lora
    job = cl_gpu.make_job(engine, root, "ft", record=False)
    cl_gpu.feed(job, cfg, 256, seed=5)
    rider = job.graphed
    rider.gate = None  # every step with budget carries rows: the cost of riding, not the controller's choice
    res: dict = {"command": "python bench/cl_fused_profile.py " + " ".join(sys.argv[1:]), "seqs": args.seqs}
    res["device"] = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    res["commit"] = cl_gpu._commit()
    res["ride_rows"] = rider.ride_rows
    res["ride_lora"] = "segments" if rider.slot is not None else "own"
    res["fused_cap_tokens"] = rider.cap
    res["fused_prefix_cap"] = int(rider.f_pseg.shape[0])

    def hook(info) -> None:
        coserve_iteration(engine, [job], info)

    vocab = min(engine.model.shape.vocab_size, 30000)
    params = SamplingParams(
        temperature=0.0, max_tokens=engine.config.max_model_len - cfg.inf_prompt - 1, ignore_eos=True
    )
    for i in range(args.seqs):
        engine.add_request(
            f"r{i}", [(i * 7919 + j * 104729) % (vocab - 10) + 10 for j in range(cfg.inf_prompt)], params, "ad"
        )
    rider.ride_enabled = False
    while any(s.num_output_tokens == 0 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    _steps(engine, 10)
    res["alone"] = _summary(_steps(engine, args.steps))
    res["decoding_seqs"] = len(engine.scheduler.running)

    rider.ride_enabled = True
    rider.serving_busy = engine.has_unfinished_requests
    engine.launch_hooks.append(hook)
    _steps(engine, 20)  # captures, arming
    r0, n0 = rider.rows_ridden, job.sequence_tokens
    t0 = time.perf_counter()
    xs = _steps(engine, args.steps)
    dt = time.perf_counter() - t0
    res["riding_graphs"] = _summary(xs)
    res["riding_graphs"]["rows_ridden_per_s"] = (rider.rows_ridden - r0) / dt
    res["riding_graphs"]["ft_tokens_per_s"] = (job.sequence_tokens - n0) / dt

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=acts) as prof:  # graphed ride steps (the profiler sees the kernels inside graphs)
        xs = _steps(engine, 16)
    res["riding_graphs_profiled"] = _summary(xs)
    res["riding_graphs_top"] = _table(prof)
    engine.launch_hooks.clear()
    rider.ride_enabled = False
    with profile(activities=acts) as prof:
        xs = _steps(engine, 12)
    res["plain_profiled"] = _summary(xs)
    res["plain_top"] = _table(prof, 25)
    print(json.dumps({k: v for k, v in res.items() if not k.endswith("_top")}, indent=1))
    for row in res["riding_graphs_top"][:30]:
        print(f"{row['ms']:9.2f} ms {row['count']:6d}  {row['name']}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / args.out_name).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
