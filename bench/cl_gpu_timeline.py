"""Where a co-serving iteration's time goes (host vs GPU), inference alone vs co-serving, same arrivals.

Per engine step: host time before the launch (schedule + inputs), the launch itself, the launch hook (co-serving),
the wait for the step's tokens, and the rest; GPU time of the serving step and of the training queued by the hook
(CUDA events on the serving stream, so only meaningful with --placement serving). `python
bench/cl_gpu_timeline.py --out DIR` on the GPU machine."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cl_gpu
import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--placement", default="serving", choices=("serving", "partition"))
    ap.add_argument("--load", type=float, default=0.5)
    ap.add_argument("--duration", type=float, default=8.0)
    args = ap.parse_args()
    from lorafleet.worker.engine import model_runner
    from lorafleet.worker.gpu import prioritise_serving_stream

    cfg = cl_gpu.Cfg(False, "cuda")
    cfg.duration = args.duration
    work = Path(tempfile.mkdtemp())
    engine, root = cl_gpu.setup(cfg, work)
    engine._bench_placement = args.placement
    prioritise_serving_stream(engine.device)
    stream = torch.cuda.current_stream()
    rec: list[dict] = []
    cur: dict = {}
    orig_launch = engine.runner.launch
    orig_tolist = model_runner.SampledTokens.tolist
    orig_step = engine.step

    def ev():
        e = torch.cuda.Event(enable_timing=True)
        e.record(stream)
        return e

    def launch(batch, pending=None):
        cur["t_launch0"] = time.perf_counter()
        cur["e0"] = ev()
        out = orig_launch(batch, pending)
        cur["e1"] = ev()
        cur["t_launch1"] = time.perf_counter()
        return out

    def tolist(self):
        t = time.perf_counter()
        out = orig_tolist(self)
        cur["wait"] = cur.get("wait", 0.0) + time.perf_counter() - t
        return out

    def step():
        cur.clear()
        t0 = time.perf_counter()
        out = orig_step()
        cur["t0"], cur["t1"] = t0, time.perf_counter()
        if "e0" in cur:
            rec.append(dict(cur))
        return out

    engine.runner.launch = launch
    model_runner.SampledTokens.tolist = tolist
    engine.step = step

    def execute(batch):  # inference alone takes the same launch-then-wait path as co-serving
        st = engine.runner.launch(batch)
        return dict(zip(st.seqs, st.tolist(), strict=True))

    engine.runner.execute = execute

    cl_gpu.run_load(engine, cfg, None, seed=1)
    closed = cl_gpu.run_load(engine, cfg, None, seed=2)
    rate = args.load * closed["req_per_s"]
    job = cl_gpu.make_job(engine, root, "ft", record=False)
    cl_gpu.feed(job, cfg, 256, seed=5)
    alone_ft = cl_gpu.finetune_alone(engine, job, cfg)
    res = {
        "command": "python bench/cl_gpu_timeline.py " + " ".join(sys.argv[1:]),
        "rate": rate,
        "finetune_alone": alone_ft,
        "device": torch.cuda.get_device_name(0),
    }
    for mode in ("alone", "coserve"):
        rec.clear()
        if mode == "coserve":
            inf = res["alone"]
            job.scheduler.cfg.tpot_target_s = 1.10 * inf["tpot_p99"]
        r = cl_gpu.run_load(engine, cfg, rate, seed=21, job=job if mode == "coserve" else None, mode=mode)
        torch.cuda.synchronize()
        rows = []
        for i, c in enumerate(rec[:-1]):
            nxt = rec[i + 1]
            row = {
                "host_before_launch": c["t_launch0"] - c["t0"],
                "launch": c["t_launch1"] - c["t_launch0"],
                "wait_tokens": c.get("wait", 0.0),
                "step_total": c["t1"] - c["t0"],
                "between_steps": nxt["t0"] - c["t1"],
                "gpu_serving": c["e0"].elapsed_time(c["e1"]) / 1e3,
                # from the end of this step's kernels to the start of the next step's: training + idle
                "gpu_after_step": c["e1"].elapsed_time(nxt["e0"]) / 1e3,
                "cycle": nxt["t0"] - c["t0"],
            }
            rows.append(row)
        summ = {k: statistics.fmean(r_[k] for r_ in rows) for k in rows[0]}
        summ.update(
            {
                "tpot_p50": cl_gpu.pct(r["tpot"], 0.5),
                "tpot_p99": cl_gpu.pct(r["tpot"], 0.99),
                "ft_tokens_per_s": r["ft_tokens_per_s"],
                "steps": len(rows),
                "pieces": r["pieces"],
                "hook_seconds_mean": r["piece_seconds_mean"],
            }
        )
        res[mode] = summ
        print(mode, json.dumps(summ, indent=1), file=sys.stderr, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cl_gpu_timeline.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
