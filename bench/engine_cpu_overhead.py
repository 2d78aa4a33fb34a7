"""Per-step host overhead of the real LLMEngine on CPU: step wall time minus the model's own forward time.

Why this measure: on an H200 the LLMEngine reached 22-29% of a minimal driver's tokens/s because its per-step
Python (scheduling, building inputs from lists, sampling bookkeeping, detokenisation) serialises with a 2-3 ms GPU
step. On CPU with a tiny model the forward is small too, so everything around it shows up clearly. The model's
`forward` and `compute_logits` are timed by wrapping them; the rest of `step()` is host overhead.

Usage: python -P bench/engine_cpu_overhead.py [--tree DIR] [--label NAME] [--out FILE]. `--tree` runs another
checkout's engine (e.g. a `git worktree` of an earlier commit) in a child process, so before/after come from one
run on the same machine state; with `--compare DIR` this script runs both and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLING = {
    "greedy": {"temperature": 0.0},
    "temp0.8": {"temperature": 0.8},
    "temp0.8_top_p0.95": {"temperature": 0.8, "top_p": 0.95},
}


def measure(
    batch_sizes: list[int], steps: int, threads: int, adapters: int, sampling: str, final_text: bool = False
) -> dict:
    import torch

    torch.set_num_threads(threads)
    from lorafleet.worker.config import EngineConfig
    from lorafleet.worker.engine.llm_engine import LLMEngine
    from lorafleet.worker.engine.sequence import SamplingParams
    from lorafleet.worker.testing import build_peft_adapter, build_tiny_llama

    tmp = Path(tempfile.mkdtemp(prefix="ovh-"))
    model = build_tiny_llama(tmp / "model", seed=0)
    paths = [
        build_peft_adapter(tmp / f"ad{i}", model, rank=8, alpha=16, seed=i, use_rslora=False, targets=None, std=0.05)
        for i in range(adapters)
    ]
    results = {}
    for bs in batch_sizes:
        eng = LLMEngine(
            EngineConfig(
                model=str(model),
                device="cpu",
                max_num_seqs=bs,
                max_num_batched_tokens=max(2048, bs * 16),
                block_size=16,
                num_kv_blocks=bs * 8 + 8,
                max_loras=max(1, adapters),
                max_cpu_loras=max(1, adapters),
                adapter_roots=[str(tmp)],
            )
        )
        for i, p in enumerate(paths):
            eng.load_adapter(f"ad{i}", str(p))
        fwd = {"s": 0.0}
        for obj, name in ((eng.model, "forward"), (eng.model, "compute_logits")):
            orig = getattr(obj, name)

            def timed(*a, _orig=orig, _fwd=fwd, **k):
                t = time.perf_counter()
                out = _orig(*a, **k)
                _fwd["s"] += time.perf_counter() - t
                return out

            setattr(obj, name, timed)
        text = {"incremental_text": False} if final_text else {}  # a non-streaming request: text decoded at the end
        params = SamplingParams(max_tokens=steps + 8, ignore_eos=True, **SAMPLING[sampling], **text)
        for i in range(bs):
            prompt = [(7 * i + j) % 300 + 20 for j in range(16)]
            eng.add_request(f"r{i}", prompt, params, f"ad{i % adapters}" if adapters else None)
        while (
            any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.waiting)
            or len(eng.scheduler.running) < bs
        ):
            eng.step()  # admit + prefill everyone
        eng.step()
        host, total = [], []
        for _ in range(steps):
            fwd["s"] = 0.0
            t = time.perf_counter()
            outs = eng.step()
            dt = time.perf_counter() - t
            assert len(outs) == bs and all(len(o.new_token_ids) == 1 for o in outs)
            host.append((dt - fwd["s"]) * 1e3)
            total.append(dt * 1e3)
        results[str(bs)] = {
            "host_ms_median": round(statistics.median(host), 3),
            "host_ms_p90": round(sorted(host)[int(0.9 * len(host))], 3),
            "step_ms_median": round(statistics.median(total), 3),
            "forward_ms_median": round(statistics.median(total) - statistics.median(host), 3),
            "host_us_per_seq": round(statistics.median(host) * 1e3 / bs, 2),
        }
        for i in range(bs):
            eng.abort_request(f"r{i}")
        eng.step()
    return results


def _child(tree: str | None, argv: list[str]) -> dict:
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = tree  # a dir whose `lorafleet` package maps to the other checkout
    out = subprocess.run(
        [sys.executable, "-P", __file__, *argv], env=env, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _best(runs: list[dict]) -> dict:
    """Per batch size, the run with the lowest median host time (the machine is shared: noise only adds)."""
    return {k: min((r[k] for r in runs), key=lambda x: x["host_ms_median"]) for k in runs[0]}


def _provenance() -> dict:
    """command, device and commit, as every result under bench/results carries."""
    import platform

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    return {
        "command": " ".join(["python", *sys.argv]),
        "device": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "commit": commit.stdout.strip() or None,
    }


def _child_args(args, sampling: str) -> list[str]:
    """The measurement flags a child run gets (everything but what the parent compares)."""
    return [
        *("--batch-sizes", args.batch_sizes, "--steps", str(args.steps), "--threads", str(args.threads)),
        *("--adapters", str(args.adapters), "--sampling", sampling),
    ]


def _final_text_ab(args, sizes: list[int]) -> None:
    """Host overhead of streaming requests (text every token) vs non-streaming ones (`incremental_text=False`:
    the engine decodes the output once when it ends), alternating runs of this tree, best of each."""
    common = _child_args(args, args.sampling)
    per_token, final = [], []
    for _ in range(args.rounds):
        per_token.append(_child(None, common))
        final.append(_child(None, [*common, "--final-text"]))
    a, b = _best(per_token), _best(final)
    report = {
        **_provenance(),
        "what": "LLMEngine.step() host overhead (wall minus forward+logits), decode steps of N sequences, tiny Llama "
        f"on CPU, {args.sampling}; text decoded every token (a streaming request) vs once at the end (non-streaming); "
        f"best of {args.rounds} alternating runs",
        "per_token_text": a,
        "final_text": b,
        "metrics": {
            f"host_overhead_speedup_final_text_bs{k}": round(a[k]["host_ms_median"] / b[k]["host_ms_median"], 2)
            for k in b
        },
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["metrics"], indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", default="64,128,256")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--sampling", default="greedy", choices=sorted(SAMPLING))
    ap.add_argument("--rounds", type=int, default=2, help="before/after alternations per sampling mode")
    ap.add_argument("--compare", default=None, help="import root of the 'before' tree (see module docstring)")
    ap.add_argument("--before-label", default="before")
    ap.add_argument("--out", default="bench/results/engine_cpu_overhead.json")
    ap.add_argument("--final-text", action="store_true", help="requests read their text at the end only")
    ap.add_argument(
        "--final-text-ab", action="store_true", help="this tree, per-token text vs final-only text (`--out` JSON)"
    )
    args = ap.parse_args()
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    if args.final_text_ab:
        _final_text_ab(args, sizes)
        return
    if args.compare is None:
        print(json.dumps(measure(sizes, args.steps, args.threads, args.adapters, args.sampling, args.final_text)))
        return
    report: dict = {
        **_provenance(),
        "what": "LLMEngine.step() wall time minus model forward+logits (host overhead), decode steps of a batch "
        f"of N sequences, tiny Llama on CPU, {args.adapters} adapters, {args.threads} torch thread(s); best of "
        f"{args.rounds} alternating before/after runs (shared machine)",
        "before_label": args.before_label,
        "modes": {},
    }
    for mode in SAMPLING:
        common = _child_args(args, mode)
        befores, afters = [], []
        for _ in range(args.rounds):
            befores.append(_child(args.compare, common))
            afters.append(_child(None, common))
        before, after = _best(befores), _best(afters)
        report["modes"][mode] = {
            "before": before,
            "after": after,
            "host_speedup": {k: round(before[k]["host_ms_median"] / after[k]["host_ms_median"], 2) for k in after},
        }
        print(mode, json.dumps(report["modes"][mode]["host_speedup"]), file=sys.stderr, flush=True)
    report["metrics"] = {
        f"host_overhead_speedup_{mode}_bs{max(sizes)}": m["host_speedup"][str(max(sizes))]
        for mode, m in report["modes"].items()
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
