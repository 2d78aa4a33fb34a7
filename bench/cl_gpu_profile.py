"""Kernel-time profile of one graphed co-serving micro-batch (run eagerly so the profiler sees each kernel):
where the GPU time of a fine-tuning piece goes. `python bench/cl_gpu_profile.py --out DIR` on the GPU machine."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cl_gpu  # noqa: E402  (import shim + model/job builders)
import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    cfg = cl_gpu.Cfg(False, "cuda")
    work = Path(tempfile.mkdtemp())
    engine, root = cl_gpu.setup(cfg, work)
    job = cl_gpu.make_job(engine, root, "ft", record=False)
    cl_gpu.feed(job, cfg, 64, seed=5)
    g = job.graphed
    g.use_graphs = False  # eager: the profiler sees every kernel (a captured graph runs the same kernels)
    for _ in range(4):
        job.scheduler.plan(cfg.budget, 0, False)
        job.work(cfg.budget)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            job.work(cfg.budget)
        torch.cuda.synchronize()
    ka = prof.key_averages()
    rows = sorted(
        ((e.key, e.device_time_total / 1e3, e.count) for e in ka if e.device_time_total > 0),
        key=lambda r: -r[1],
    )
    total = sum(r[1] for r in rows if not r[0].startswith("aten::") and not r[0].startswith("autograd"))
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=45)
    print(table)
    res = {
        "command": "python bench/cl_gpu_profile.py",
        "device": torch.cuda.get_device_name(0),
        "seconds_per_unit_graphed": g.seconds_per_unit,
        "top": [{"name": n[:120], "ms": ms, "count": c} for n, ms, c in rows[:60]],
        "kernel_ms_total_approx": total,
        "microbatches": 4,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cl_gpu_profile.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
