"""Micro-benchmark and launch-parameter sweep of the Triton LoRA kernels at Llama-3.1-8B projection shapes.

Why: the step-overhead targets are decided by how close shrink/expand get to moving only the bytes they must
(x once, each distinct adapter's A/B once, y read + written once). For the decode regime (256 rows, 32
adapters; the step-overhead targets) and each kernel, every candidate configuration is checked against the default's result and timed with
`triton.testing.do_bench` (median); the report gives time, minimum bytes and achieved bandwidth, and the best
configuration per regime, which `triton_ops.TUNING` then carries.
"""

from __future__ import annotations

import itertools
import time

import torch
import triton
from lorafleet.worker.lora import triton_ops

S, R = 128, 16


def _segs(t: int, distinct: int, dev: str) -> tuple[torch.Tensor, torch.Tensor]:
    per = [t // distinct + (1 if i < t % distinct else 0) for i in range(distinct)]
    indptr = torch.tensor([0] + torch.tensor(per).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    slots = torch.tensor(sorted(torch.randperm(S)[:distinct].tolist()), dtype=torch.int32, device=dev)
    return indptr, slots


def cases(t: int, distinct: int) -> dict:
    """Two shrinks (qkv-stacked K=4096 R=48; down K=14336 R=16) and two expands (qkv 3 slices; gate|up 2 slices)."""
    dev = "cuda"
    indptr, slots = _segs(t, distinct, dev)
    sc = torch.rand(S, device=dev) + 0.5
    out = {}
    for name, k, r in (("shrink_qkv", 4096, 3 * R), ("shrink_down", 14336, R)):
        x = torch.randn(t, k, device=dev, dtype=torch.bfloat16)
        a = torch.randn(S, r, k, device=dev, dtype=torch.bfloat16) / k**0.5
        v = torch.zeros(t, r, device=dev)
        nbytes = x.numel() * 2 + distinct * r * k * 2 + t * r * 4

        def fn(x=x, a=a, v=v):
            return triton_ops.lora_shrink_accumulate(x, a, indptr, slots, v)

        out[name] = (fn, v, nbytes, "shrink")
    for name, bounds in (("expand_qkv", (0, 4096, 5120, 6144)), ("expand_gu", (0, 14336, 28672))):
        n = bounds[-1]
        ns = len(bounds) - 1
        v = torch.randn(t, ns * R, device=dev)
        b = torch.randn(S, n, R, device=dev, dtype=torch.bfloat16) * 0.05
        y = torch.randn(t, n, device=dev, dtype=torch.bfloat16)
        nbytes = 2 * y.numel() * 2 + distinct * n * R * 2 + v.numel() * 4

        def fn(v=v, b=b, y=y, bounds=bounds):
            return triton_ops.lora_expand_slices(v, b, indptr, slots, sc, y, bounds)

        out[name] = (fn, y, nbytes, "expand")
    return out


def grid(kind: str, regime: str) -> list[dict[str, int]]:
    if kind == "shrink":
        it = itertools.product([64, 128, 256], [4, 8, 16, 32], [2, 3])
        return [dict(block_m=16, block_k=bk, split=sp, num_warps=4, num_stages=st) for bk, sp, st in it]
    it = itertools.product([16, 32], [64, 128, 256], [2, 4, 8])
    return [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=2) for bm, bn, w in it]


def bench(fn) -> float:
    """Median ms of `fn` replayed from a CUDA graph: kernels of a few microseconds are otherwise timed as
    Python launch overhead (a first sweep with plain do_bench picked configs that did not move the step time)."""
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")


def run(budget_s: float = 100.0) -> dict:
    """Sweep; returns {regime: {kernel: {default, best, configs}}} and sets triton_ops.TUNING to the winners
    (a winner must beat the default on every kernel of its kind in that regime by summed time)."""
    t_start = time.perf_counter()
    report: dict = {}
    for regime, t, distinct in (("decode", 256, 32),):
        cs = cases(t, distinct)
        report[regime] = {}
        for kind in ("shrink", "expand"):
            key = f"{kind}_{regime}"
            names = [n for n, c in cs.items() if c[3] == kind]
            triton_ops.TUNING[key] = {}
            ref, base = {}, {}
            for n in names:
                fn, outbuf, nbytes, _ = cs[n]
                fn()
                ref[n] = outbuf.clone()
                base[n] = bench(fn)
            results = []
            for cfg in grid(kind, regime):
                if time.perf_counter() - t_start > budget_s:
                    break
                triton_ops.TUNING[key] = cfg
                total, ok = 0.0, True
                for n in names:
                    fn, outbuf, nbytes, _ = cs[n]
                    try:
                        fn()
                        total += bench(fn)
                    except Exception as e:  # noqa: BLE001 - a config that fails to compile is skipped
                        ok = False
                        results.append({"cfg": cfg, "error": repr(e)[:120]})
                        break
                if ok:
                    results.append({"cfg": cfg, "ms": total})
            triton_ops.TUNING[key] = {}
            good = [r for r in results if "ms" in r]
            best = min(good, key=lambda r: r["ms"]) if good else None
            default_total = sum(base.values())
            entry = {
                "default_ms": base,
                "default_total_ms": default_total,
                "min_bytes": {n: cs[n][2] for n in names},
                "default_gbps": {n: cs[n][2] / base[n] / 1e6 for n in names},
                "best": best,
                "tried": len(results),
            }
            if best and best["ms"] < 0.97 * default_total:
                triton_ops.TUNING[key] = best["cfg"]
                entry["chosen"] = best["cfg"]
                # correctness of the winner against the default's result (shrink accumulates: compare increments)
                for n in names:
                    fn, outbuf, _, _ = cs[n]
                    outbuf.normal_()  # timing replays accumulated into it (bf16 y can reach inf)
                    before = outbuf.clone()
                    fn()
                    got = outbuf.float() - before.float()
                    outbuf.copy_(before)
                    triton_ops.TUNING[key] = {}
                    fn()
                    want = outbuf.float() - before.float()
                    outbuf.copy_(before)
                    triton_ops.TUNING[key] = best["cfg"]
                    rel = ((got - want).norm() / want.norm()).item()
                    entry.setdefault("winner_rel_err", {})[n] = rel
                    if not rel < 2e-2:
                        triton_ops.TUNING[key] = {}
                        entry["chosen"] = None
            report[regime][kind] = entry
            print(f"  {key}: default {default_total * 1e3:.1f} us, best {best}", flush=True)
    report["tuning"] = {k: dict(v) for k, v in triton_ops.TUNING.items()}
    return report
