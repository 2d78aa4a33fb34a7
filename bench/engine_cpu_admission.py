"""Slot-aware vs arrival-order admission on CPU: adapter slot loads, steps to drain, request waits.

Why on CPU: slot uploads are cheap here, so steps-to-drain shows whether the ordering costs batch occupancy, and
the load count (each one a host->GPU copy of an adapter on a real worker) shows what it saves. Workloads: a burst
of requests uniformly over many adapters, and a steady stream with a hot set, both over few slots.

Usage: python -P bench/engine_cpu_admission.py [--out bench/results/engine_cpu_admission.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WORKLOADS = {
    # name: (requests, arrivals per step, batch seats, share of requests for the 4 hot adapters)
    "burst_uniform": (160, 160, 16, 0.0),
    "stream_hot_set": (160, 2, 8, 0.45),
}


def run(model: Path, root: Path, paths: list[Path], policy: str, workload: str, slots: int, names: int) -> dict:
    from lorafleet.worker.config import EngineConfig
    from lorafleet.worker.engine.llm_engine import LLMEngine
    from lorafleet.worker.engine.sequence import SamplingParams

    n_req, per_step, seats, hot = WORKLOADS[workload]
    eng = LLMEngine(
        EngineConfig(
            model=str(model),
            device="cpu",
            block_size=4,
            num_kv_blocks=512,
            max_loras=slots,
            max_cpu_loras=names,
            max_num_seqs=seats,
            adapter_roots=[str(root)],
            lora_admission=policy,
        )
    )
    adapter_names = [f"m{i}" for i in range(names)]
    for i, n in enumerate(adapter_names):
        eng.load_adapter(n, str(paths[i % len(paths)]))
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    reqs = []
    for i in range(n_req):
        r = rng.random()
        name = None if r < 0.1 else (rng.choice(adapter_names[:4]) if r < 0.1 + hot else rng.choice(adapter_names))
        reqs.append((f"r{i}", [rng.randrange(10, 370) for _ in range(rng.randint(3, 10))], name))
    seqs, arrived, done, k = {}, {}, 0, 0
    while done < n_req:
        for _ in range(per_step):
            if k < n_req:
                rid, prompt, name = reqs[k]
                eng.add_request(rid, prompt, params, name)
                seqs[rid], arrived[rid] = eng._requests[rid], eng.scheduler.passes
                k += 1
        done += sum(1 for o in eng.step() if o.finished)
    waits = sorted(s.admitted_pass - arrived[r] - 1 for r, s in seqs.items())
    return {
        "slot_loads": eng.store.counters["slot_loads"],
        "steps": eng._step,
        "wait_steps_mean": round(statistics.mean(waits), 2),
        "wait_steps_p95": waits[int(0.95 * len(waits))],
        "wait_steps_max": waits[-1],
    }


def _provenance() -> dict:
    """command, device and commit, as every result under bench/results carries."""
    import platform

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    return {
        "command": " ".join(["python", *sys.argv]),
        "device": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "commit": commit.stdout.strip() or None,
    }


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--out", default="bench/results/engine_cpu_admission.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from lorafleet.worker.testing import build_peft_adapter, build_tiny_llama

    root = Path(tempfile.mkdtemp(prefix="adm-"))
    model = build_tiny_llama(root / "model", seed=0)
    paths = [build_peft_adapter(root / f"a{i}", model, rank=4 * (i + 1), seed=i, std=0.1) for i in range(4)]
    report: dict = {
        **_provenance(),
        "what": f"{args.adapters} adapters over {args.slots} slots, tiny Llama on CPU, greedy 6 tokens; "
        "max_admission_wait_steps 32 (default)",
        "workloads": {
            name: dict(zip(("requests", "arrivals_per_step", "max_num_seqs", "hot_share"), w, strict=True))
            for name, w in WORKLOADS.items()
        },
        "results": {},
    }
    for workload in WORKLOADS:
        report["results"][workload] = {
            policy: run(model, root, paths, policy, workload, args.slots, args.adapters)
            for policy in ("fifo", "slot_aware")
        }
    report["metrics"] = {
        f"admission_slot_loads_ratio_{w}": round(r["slot_aware"]["slot_loads"] / r["fifo"]["slot_loads"], 3)
        for w, r in report["results"].items()
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
