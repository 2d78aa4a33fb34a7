"""Engine GPU benchmarks (issue 3): step overhead of unmerged multi-LoRA, batch-1 HBM efficiency, throughput with
1/32/128/512 adapters, cold-adapter first-token latency, and the transformers+peft baseline, all in one process.

Run on the GPU machine: `python bench/engine_bench.py --phase all --out DIR` (PYTHONPATH must make `lorafleet`
importable). Each phase writes its own JSON (`engine_<phase>.json`) as soon as it finishes, so a failure later
loses nothing; `--phase` can repeat. Every JSON holds `command`, `device`, `commit`, `metrics` and raw numbers.
What is measured is the bench model in `gpu_llama.py` driven by `engine_sim.py` (see their docstrings), not the
HTTP server: the kernels, graphs and batching policy are the engine's, the Python scheduler is a minimal one.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from common import LLAMA_31_8B, LLAMA_32_1B, commit
from engine_sim import Req, Sim, decode_example, make_requests
from gpu_llama import BenchLlama, Shape, adapter_bytes
from lorafleet.worker.engine.cuda_graph import CudaGraphRunner, default_sizes

RANK = 16


def device_info() -> dict:
    info = {"torch": torch.__version__, "name": torch.cuda.get_device_name(0)}
    try:
        import triton

        info["triton"] = triton.__version__
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except Exception as e:  # noqa: BLE001 - informational only
        info["nvidia_smi_error"] = repr(e)
    return info


def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**shape)


def time_ms(fn, iters: int = 30, warmup: int = 5) -> list[float]:
    """Per-call device times (ms) from CUDA events around each call, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def calib() -> dict:
    """Copy bandwidth (bytes read + written) and bf16 GEMM rate, measured in this run (METHOD.md)."""
    n = 1 << 30  # 2 GiB bf16 each side
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    t = statistics.median(time_ms(lambda x=x, y=y: y.copy_(x), 20))
    bw = 2 * x.numel() * 2 / (t / 1e3)
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    tg = statistics.median(time_ms(lambda a=a, b=b: a @ b, 20))
    del a, b
    torch.cuda.empty_cache()
    return {"copy_bw_bytes_per_s": bw, "copy_ms_2GiB": t, "gemm_8192_tflops": 2 * 8192**3 / (tg / 1e3) / 1e12}


def step_times(model: BenchLlama, bs: int, ctx: int, configs: list[tuple[str, bool, int]], iters: int) -> dict:
    """Median decode-step time through a CUDA graph for each (label, use_lora, distinct adapters)."""
    res = {}
    for label, use_lora, n in configs:
        slots = [i % max(n, 1) for i in range(bs)] if use_lora else [-1] * bs
        maxb = (ctx + model.page - 1) // model.page + 1
        ex = decode_example(bs, maxb, model.page, ctx, slots, torch.device("cuda"))
        runner = CudaGraphRunner(
            lambda inp, u=use_lora: model.forward(inp, 1, u, last_only=False), [], [bs], lambda _, ex=ex: ex
        )
        g = runner.graphs[bs]
        ts = time_ms(g.replay, iters)
        res[label] = {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "bs": bs, "ctx": ctx}
        print(f"  step bs={bs} ctx={ctx} {label}: {res[label]['median_ms']:.3f} ms", flush=True)
        del runner, g
        torch.cuda.empty_cache()
    return res


def prefill_times(model: BenchLlama, n_seqs: int, plen: int, configs: list[tuple[str, bool, int]]) -> dict:
    """Eager forward time of one prefill batch (n_seqs x plen tokens), LoRA vs none: the cost that a scheduler pays
    whenever it admits requests."""
    import numpy as np
    from engine_sim import segments

    dev = torch.device("cuda")
    page = model.page
    nb = (plen + page - 1) // page
    res = {}
    for label, use_lora, n in configs:
        slots = sorted(i % max(n, 1) for i in range(n_seqs)) if use_lora else [-1] * n_seqs
        bt = np.zeros((n_seqs, nb), dtype=np.int32)
        for i in range(n_seqs):
            bt[i] = 1 + i * nb + np.arange(nb)
        pos = np.tile(np.arange(plen), n_seqs)
        row = np.repeat(np.arange(n_seqs), plen)
        slot_map = bt[row, pos // page].astype(np.int64) * page + pos % page
        ind, ss = segments(np.repeat(slots, plen))
        inp = {
            "input_ids": torch.randint(0, 1000, (n_seqs * plen,), device=dev),
            "positions": torch.from_numpy(pos).to(dev),
            "slot_mapping": torch.from_numpy(slot_map).to(dev),
            "block_table": torch.from_numpy(bt).to(dev),
            "seq_lens": torch.full((n_seqs,), plen, dtype=torch.int32, device=dev),
            "q_indptr": torch.arange(0, n_seqs * plen + 1, plen, dtype=torch.int32, device=dev),
            "seg_indptr": torch.from_numpy(ind).to(dev),
            "seg_slots": torch.from_numpy(ss).to(dev),
        }
        ts = time_ms(lambda inp=inp, u=use_lora: model.forward(inp, plen, u, last_only=True), 8, 2)
        res[label] = {"median_ms": statistics.median(ts), "tokens": n_seqs * plen}
        print(f"  prefill {n_seqs}x{plen} {label}: {res[label]['median_ms']:.2f} ms", flush=True)
    return res


def eager_vs_graph(model: BenchLlama, bs: int, ctx: int) -> dict:
    slots = list(range(bs))
    maxb = (ctx + model.page - 1) // model.page + 1
    ex = decode_example(bs, maxb, model.page, ctx, slots, torch.device("cuda"))
    eager = statistics.median(time_ms(lambda: model.forward(ex, 1, True, False), 10, 3))
    return {"eager_ms": eager}


def cold_ttft(model: BenchLlama, plen: int, reps: int = 5) -> dict:
    """First-token latency of one request on an idle engine when its adapter is (a) in a GPU slot, (b) only in
    pinned host memory, (c) only on local disk as safetensors (page cache warm). Wall clock, synced."""
    from safetensors.torch import load_file, save_file

    names = list(model.lora)
    host = {k: torch.empty((4,) + tuple(v.shape[1:]), dtype=v.dtype, pin_memory=True) for k, v in model.lora.items()}
    for k in names:
        for i in range(4):
            host[k][i].copy_(model.lora[k][i % model.num_slots])
    sim = Sim(model, 1, [1], True, plen + 8, host_store=host)
    path = Path("/tmp/lf_cold_adapter.safetensors")
    save_file({k: host[k][0].clone() for k in names}, str(path))

    def one(adapter: int) -> float:
        """Wall time from arrival to the first token on the host (includes any adapter load)."""
        r = Req(adapter + 1000, plen, 1, adapter)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r.slot = sim._acquire(adapter)
        need = (plen + 1 + model.page - 1) // model.page
        r.blocks = [sim.free.popleft() for _ in range(need)]
        sim._prefill([r])
        sim.last_tok[r.rid].item()
        dt = time.perf_counter() - t0
        sim.free.extend(r.blocks)
        sim._release(r.slot)
        return dt * 1e3

    def evict(adapter: int) -> None:
        s = sim.slot_of.pop(adapter, None)
        if s is not None:
            sim.slot_owner[s] = -1

    out: dict[str, list[float]] = {"warm_ms": [], "host_ms": [], "disk_ms": [], "h2d_only_ms": []}
    one(0)  # compile
    evict(0)
    for i in range(reps):
        out["host_ms"].append(one(1 + i % 3))  # 3 host adapters cycle through 1 slot -> always a load
        out["warm_ms"].append(one(1 + i % 3))  # same adapter again: resident
        evict(1 + i % 3)
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sd = load_file(str(path))
        for k in names:
            host[k][3].copy_(sd[k])
        out["disk_ms"].append((time.perf_counter() - t0) * 1e3 + one(3))
        evict(3)
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for k in names:
            model.lora[k][0].copy_(host[k][1], non_blocking=True)
        torch.cuda.synchronize()
        out["h2d_only_ms"].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in out.items()}
    return {"raw": out, "median": med, "prompt_len": plen, "adapter_bytes": adapter_bytes(model.sh, RANK)}


def throughput(
    model, mix: str, n_req: int, n_adapters: int, max_bs: int, use_lora: bool, max_len: int, host=None
) -> dict:
    reqs = make_requests(n_req, mix, n_adapters if use_lora else 0, seed=1, max_len=max_len)
    sim = Sim(model, max_bs, default_sizes(max_bs), use_lora, max_len, host_store=host)
    warm = make_requests(min(8, n_req), mix, n_adapters if use_lora else 0, seed=2, max_len=max_len)
    for r in warm:
        r.rid += 500000
    sim.run(warm)  # compile prefill shapes
    sim.loads = 0
    res = sim.run(reqs)
    res.update({"mix": mix, "adapters": n_adapters if use_lora else 0, "max_bs": max_bs, "lora": use_lora})
    print(
        f"  {mix} adapters={res['adapters']} lora={use_lora}: {res['tokens_per_s']:.0f} tok/s ({res['wall_s']:.2f} s)",
        flush=True,
    )
    del sim
    torch.cuda.empty_cache()
    return res


def hf_peft(shape: dict, n_adapters: int, batch_sizes: list[int], plen: int, steps: int) -> dict:
    """transformers + peft, mixed-adapter batches via `adapter_names`, static batches, greedy decode; tokens/s of
    the decode steps only (prefill excluded, which favours the baseline)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    cfg = llama_config(shape)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lcfg = LoraConfig(r=RANK, lora_alpha=32, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(model, lcfg, adapter_name="ad0")
    for i in range(1, n_adapters):
        model.add_adapter(f"ad{i}", lcfg)
    model.to(torch.bfloat16)
    model.eval()  # peft refuses adapter_names in training mode
    build_s = time.perf_counter() - t0
    print(f"  hf+peft built in {build_s:.1f} s", flush=True)
    out = {"build_s": build_s, "by_batch": {}}
    best = 0.0
    for bs in batch_sizes:
        try:
            names = [f"ad{i % n_adapters}" for i in range(bs)]
            ids = torch.randint(0, 1000, (bs, plen), device="cuda")
            with torch.no_grad():
                o = model(input_ids=ids, adapter_names=names, use_cache=True)
                pkv = o.past_key_values
                nxt = o.logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                ts = []
                for _ in range(steps):
                    t1 = time.perf_counter()
                    o = model(input_ids=nxt, past_key_values=pkv, adapter_names=names, use_cache=True)
                    pkv = o.past_key_values
                    nxt = o.logits[:, -1].argmax(-1, keepdim=True)
                    torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t1)
            step = statistics.median(ts[1:] if len(ts) > 2 else ts)
            tps = bs / step
            out["by_batch"][bs] = {"step_s": step, "tokens_per_s": tps, "steps": ts}
            best = max(best, tps)
            print(f"  hf+peft bs={bs}: {step:.3f} s/step, {tps:.1f} tok/s", flush=True)
            del o, pkv
            torch.cuda.empty_cache()
        except torch.OutOfMemoryError as e:
            out["by_batch"][bs] = {"error": repr(e)[:200]}
            torch.cuda.empty_cache()
    out["best_tokens_per_s"] = best
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def write(out_dir: Path, name: str, payload: dict) -> None:
    payload = {"command": " ".join(sys.argv), "device": device_info(), "commit": commit(), **payload}
    p = out_dir / f"engine_{name}.json"
    p.write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {p}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", action="append", required=True)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--quick", action="store_true", help="fewer requests / iterations (smoke run)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    phases = set(a.phase)
    if "all" in phases:
        phases = {"8b", "hf", "1b"}
    q = a.quick
    cal = calib()
    print("calib", cal, flush=True)
    state: dict = {}
    if "tune" in phases:
        try:
            from lora_kernel_bench import run as tune_run

            rep = tune_run()
            write(out, "lora_kernels", {"metrics": {}, **rep})
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    if "8b" in phases or "8bsteps" in phases:
        try:
            run_8b(out, cal, q, state, steps_only="8b" not in phases)
        except Exception:  # noqa: BLE001 - keep going with the other phases
            traceback.print_exc()
    gc.collect()
    torch.cuda.empty_cache()
    if "hf" in phases:
        try:
            hf = hf_peft(LLAMA_31_8B, 32, [16, 64] if q else [64, 128], 128, 3 if q else 4)
            metrics = {}
            ours = state.get("ours_32_decode_heavy_tps")
            if ours:
                metrics["multilora_vs_hf_peft_throughput"] = ours / hf["best_tokens_per_s"]
            write(out, "hf_peft", {"metrics": metrics, "hf_peft_8b_32_adapters": hf, "ours_tokens_per_s": ours})
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    gc.collect()
    torch.cuda.empty_cache()
    if "1b" in phases:
        try:
            run_1b(out, cal, q)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    gc.collect()
    torch.cuda.empty_cache()
    if "llm" in phases:
        try:
            from engine_llm_bench import run as llm_run

            r = llm_run(Path("/tmp/lf_llm"), LLAMA_32_1B, 256 if q else 512, [0, 32])
            m = {f"llm_engine_1b_{k}_tok_s": v["tokens_per_s"] for k, v in r["runs"].items()}
            write(out, "llm_engine_1b", {"metrics": m, **r})
        except Exception:  # noqa: BLE001
            traceback.print_exc()


def run_8b(out: Path, cal: dict, q: bool, state: dict, steps_only: bool = False) -> None:
    cfg = llama_config(LLAMA_31_8B)
    t0 = time.perf_counter()
    slots = 128
    model = BenchLlama(cfg, num_slots=slots, rank=RANK, num_blocks=4000 if q else 12000)
    torch.cuda.synchronize()
    print(
        f"8B built in {time.perf_counter() - t0:.1f} s; mem {torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True
    )
    res: dict = {"model": "Llama-3.1-8B shape, random bf16", "rank": RANK, "slots": slots}
    wbytes = model.weight_bytes_per_step()
    res["weight_bytes_per_step"] = wbytes
    res["adapter_bytes"] = adapter_bytes(model.sh, RANK)
    it = 10 if q else 40
    cfgs = [("no_lora", False, 0), ("lora_1", True, 1), ("lora_32", True, 32), ("lora_128", True, 128)]
    res["steps_bs256_ctx128"] = st = step_times(model, 256, 128, cfgs, it)
    res["steps_bs256_ctx32"] = st32 = step_times(model, 256, 32, [cfgs[0], cfgs[2], cfgs[3]], it)
    res["steps_bs1_ctx128"] = s1 = step_times(model, 1, 128, [("no_lora", False, 0), ("lora_1", True, 1)], it)
    base = st["no_lora"]["median_ms"]
    m = {
        "lora_step_overhead_32": st["lora_32"]["median_ms"] / base,
        "lora_step_overhead_128": st["lora_128"]["median_ms"] / base,
        "lora_step_overhead_1": st["lora_1"]["median_ms"] / base,
        "lora_step_overhead_32_ctx32": st32["lora_32"]["median_ms"] / st32["no_lora"]["median_ms"],
        "lora_step_overhead_128_ctx32": st32["lora_128"]["median_ms"] / st32["no_lora"]["median_ms"],
        "decode_hbm_efficiency_bs1": wbytes / (s1["no_lora"]["median_ms"] / 1e3) / cal["copy_bw_bytes_per_s"],
        "decode_hbm_efficiency_bs1_lora": wbytes / (s1["lora_1"]["median_ms"] / 1e3) / cal["copy_bw_bytes_per_s"],
    }
    try:
        res["prefill_8192_tokens"] = pf = prefill_times(model, 32, 256, [("no_lora", False, 0), ("lora_32", True, 32)])
        m["lora_prefill_overhead_32"] = pf["lora_32"]["median_ms"] / pf["no_lora"]["median_ms"]
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    print("8B metrics so far", m, flush=True)
    write(out, "8b_steps", {"metrics": m, "calib": cal, **res})
    if steps_only:
        return
    try:
        res["cold_ttft"] = ct = cold_ttft(model, 128)
        m["cold_adapter_ttft_ms_host"] = ct["median"]["host_ms"]
        m["cold_adapter_ttft_ms_disk"] = ct["median"]["disk_ms"]
        m["warm_adapter_ttft_ms"] = ct["median"]["warm_ms"]
        print("cold", ct["median"], flush=True)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    n = 256 if q else 768
    tp = {}
    for mix in ("decode_heavy", "sharegpt"):
        for label, use_lora, na in (("no_lora", False, 0), ("lora_32", True, 32)):
            try:
                tp[f"{mix}_{label}"] = throughput(model, mix, n, na, 256, use_lora, 2048)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
    res["throughput"] = tp
    if "decode_heavy_lora_32" in tp:
        state["ours_32_decode_heavy_tps"] = tp["decode_heavy_lora_32"]["tokens_per_s"]
        m["throughput_8b_32_adapters_decode_heavy_tok_s"] = tp["decode_heavy_lora_32"]["tokens_per_s"]
        if "decode_heavy_no_lora" in tp:
            m["throughput_8b_lora32_vs_base_decode_heavy"] = (
                tp["decode_heavy_lora_32"]["tokens_per_s"] / tp["decode_heavy_no_lora"]["tokens_per_s"]
            )
    write(out, "8b", {"metrics": m, "calib": cal, **res})
    del model
    gc.collect()
    torch.cuda.empty_cache()


def run_1b(out: Path, cal: dict, q: bool) -> None:
    cfg = llama_config(LLAMA_32_1B)
    slots = 128
    model = BenchLlama(cfg, num_slots=slots, rank=RANK, num_blocks=6000 if q else 20000)
    sh: Shape = model.sh
    res: dict = {"model": "Llama-3.2-1B shape, random bf16", "rank": RANK, "slots": slots}
    wbytes = model.weight_bytes_per_step()
    it = 10 if q else 40
    cfgs = [("no_lora", False, 0), ("lora_32", True, 32), ("lora_128", True, 128)]
    res["steps_bs256_ctx128"] = st = step_times(model, 256, 128, cfgs, it)
    res["steps_bs1_ctx128"] = s1 = step_times(model, 1, 128, [("no_lora", False, 0)], it)
    m = {
        "lora_step_overhead_32_1b": st["lora_32"]["median_ms"] / st["no_lora"]["median_ms"],
        "lora_step_overhead_128_1b": st["lora_128"]["median_ms"] / st["no_lora"]["median_ms"],
        "decode_hbm_efficiency_bs1_1b": wbytes / (s1["no_lora"]["median_ms"] / 1e3) / cal["copy_bw_bytes_per_s"],
    }
    write(out, "1b", {"metrics": m, "calib": cal, **res})
    n = 256 if q else 768
    tp = {}
    for mix in ("decode_heavy", "sharegpt"):
        for label, use_lora, na in (
            ("no_lora", False, 0),
            ("lora_1", True, 1),
            ("lora_32", True, 32),
            ("lora_128", True, 128),
        ):
            try:
                tp[f"{mix}_{label}"] = throughput(model, mix, n, na, 256, use_lora, 2048)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        write(out, "1b", {"metrics": m, "calib": cal, **res, "throughput": tp})
    # 512 adapters over 128 GPU slots, backed by pinned host memory
    try:
        t0 = time.perf_counter()
        host = {}
        for k, v in model.lora.items():
            h = torch.empty((512,) + tuple(v.shape[1:]), dtype=v.dtype, pin_memory=True)
            for i in range(0, 512, slots):
                h[i : i + slots].copy_(v[: min(slots, 512 - i)])
            host[k] = h
        res["host_store_build_s"] = time.perf_counter() - t0
        for mix in ("decode_heavy", "sharegpt"):
            r = throughput(model, mix, n, 512, 256, True, 2048, host=host)
            tp[f"{mix}_lora_512_over_{slots}_slots"] = r
            m[f"throughput_1b_512_adapters_{slots}_slots_{mix}_tok_s"] = r["tokens_per_s"]
            if f"{mix}_lora_128" in tp:
                m[f"throughput_1b_512_over_{slots}_vs_128_resident_{mix}"] = (
                    r["tokens_per_s"] / tp[f"{mix}_lora_128"]["tokens_per_s"]
                )
        del host
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    for k, v in tp.items():
        m[f"throughput_1b_{k}_tok_s"] = v["tokens_per_s"]
    res["adapter_bytes"] = adapter_bytes(sh, RANK)
    write(out, "1b", {"metrics": m, "calib": cal, **res, "throughput": tp})
    del model
    gc.collect()
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
