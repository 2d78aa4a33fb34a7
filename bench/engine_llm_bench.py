"""Throughput of the real `LLMEngine` (worker/engine/llm_engine.py) on a GPU: the whole serving loop (scheduler,
block manager, adapter store, sampler, detokenizer, CUDA-graph decode) over Llama-3.2-1B and Llama-3.1-8B shapes
with rank-16 PEFT adapters on all 7 projections, async scheduling off and on.

Why next to `engine_bench.py`: that one measures the kernels and a minimal driver; this one measures what a
worker pod actually runs, so the gap between the two is the cost of the engine's Python loop, and the async/sync
ratio is how much of it `EngineConfig.async_scheduling` hides behind the GPU.

What is real and what is not: every engine component is the production one, and adapters are PEFT-format
safetensors loaded through the engine's adapter path. The base weights are random N(0, 0.02) (norms 1) generated
directly on the device: the engine's safetensors loader is bypassed (`_random_weights`) so the 8B shape does not
need a 16 GB checkpoint written and read back. Only a few adapters have distinct weights; the others are hard links
of their files under their own names (each is still registered, hashed, pinned and uploaded to its own slot).

GPU (with `lorafleet` installed, bench/common.py):
    python bench/engine_llm_bench.py --out DIR            # 1B and 8B, 0/32/128 adapters + 512 over 128 slots (1B)
    python bench/engine_llm_bench.py --shapes 1b --adapters 0,32 --out DIR
CPU smoke (tiny model, seconds): python bench/engine_llm_bench.py --device cpu --tiny --out DIR
Writes DIR/engine_llm_engine.json with `command`, `device`, `commit`, `metrics` and the raw runs, after every run.
Each run also splits its time into steps with prefill tokens (eager forward) and pure decode steps (CUDA graphs),
and `--profile 0` (the default) adds cProfile + torch.profiler tables of 12 mid-run steps of the 1B, no adapters.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from common import LLAMA_31_8B, LLAMA_32_1B, StepLog, commit

ROOT = Path(__file__).resolve().parent.parent

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
RANK = 16
SHAPES = {"1b": LLAMA_32_1B, "8b": LLAMA_31_8B}
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=384,
    tie_word_embeddings=False,
    rope_theta=10000.0,
    max_position_embeddings=2048,
)


# ---- model and adapters ----------------------------------------------------------------------------------------
def write_base(root: Path, shape: dict) -> Path:
    """config.json + tokenizer only: the weights are generated on the device by `_random_weights`."""
    from lorafleet.worker.testing import build_tokenizer
    from transformers import LlamaConfig

    base = root / "base"
    base.mkdir(parents=True, exist_ok=True)
    build_tokenizer(base, vocab_size=384)
    LlamaConfig(**shape, dtype="bfloat16").save_pretrained(str(base))
    return base


@contextlib.contextmanager
def _random_weights(seed: int = 0):
    """Makes `LLMEngine` build its model with random weights on the device instead of reading safetensors."""
    from lorafleet.worker import loader
    from lorafleet.worker.engine import llm_engine

    def load_model(path, device, dtype, max_positions=None):
        hf_config = loader.load_hf_config(path)
        model = loader.build_model(hf_config, device, dtype, max_positions)
        g = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)
        return model.eval(), hf_config

    orig = llm_engine.load_model
    llm_engine.load_model = load_model
    try:
        yield
    finally:
        llm_engine.load_model = orig


def write_adapters(root: Path, shape: dict, n: int, distinct: int, device: str) -> list[Path]:
    """`n` PEFT adapter dirs; the first `distinct` have their own random A and B (std 0.02), the rest hard-link
    their files (same weights, separate names)."""
    from safetensors.torch import save_file

    h, i, d = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    nh, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    dims = {"q_proj": (h, nh * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d), "o_proj": (nh * d, h)}
    dims.update({"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)})
    cfg = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "target_modules": TARGETS,
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(root / "base"),
    }
    g = torch.Generator(device=device).manual_seed(1)
    paths = []
    for a in range(n):
        out = root / f"adapter{a}"
        out.mkdir(parents=True, exist_ok=True)
        paths.append(out)
        if a >= distinct:
            src = paths[a % distinct]
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                if not (out / f).exists():
                    os.link(src / f, out / f)
            continue
        tensors = {}
        for layer in range(shape["num_hidden_layers"]):
            for proj in TARGETS:
                fin, fout = dims[proj]
                key = f"base_model.model.model.layers.{layer}.{_PARENT.get(proj, 'mlp')}.{proj}"
                A = torch.empty(RANK, fin, device=device, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)
                B = torch.empty(fout, RANK, device=device, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)
                tensors[f"{key}.lora_A.weight"] = A.cpu()
                tensors[f"{key}.lora_B.weight"] = B.cpu()
        save_file(tensors, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    return paths


# ---- one measured run ------------------------------------------------------------------------------------------
def _requests(n_req: int, n_adapters: int, tiny: bool, seed: int = 1) -> list[tuple[int, int, int]]:
    """(prompt len, output len, adapter) per request: the `decode_heavy` mix of engine_sim (prompts 64-192,
    outputs 192-320), scaled down 8x / 24x in tiny mode."""
    from engine_sim import make_requests

    reqs = make_requests(n_req, "decode_heavy", n_adapters, seed=seed, max_len=2048)
    if tiny:
        return [(max(4, r.plen // 8), max(4, r.olen // 24), r.adapter) for r in reqs]
    return [(r.plen, r.olen, r.adapter) for r in reqs]


def measure(engine, reqs: list[tuple[int, int, int]], tag: str, async_scheduling: bool) -> dict:
    from lorafleet.worker.engine.sequence import SamplingParams

    engine.config.async_scheduling = async_scheduling  # safe between runs: nothing is in flight
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 380, (p,), generator=gen).tolist() for p, _, _ in reqs]
    names = [f"ad{a}" if a >= 0 else None for _, _, a in reqs]
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)  # Triton compiles, graph sizes, slots
    engine.generate(prompts[:8], warm, names[:8])
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    log = StepLog()
    engine.add_plugin(log)
    infos = log.infos
    preempted = engine.scheduler.num_preemptions
    t = time.perf_counter()
    for i, (_, olen, _) in enumerate(reqs):
        params = SamplingParams(temperature=0.0, max_tokens=olen, ignore_eos=True)
        engine.add_request(f"{tag}-{i}", prompts[i], params, names[i])
    toks = steps = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                toks += o.num_output_tokens
        steps += 1
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    engine.remove_plugin(log)
    planned = sum(o for _, o, _ in reqs)
    prefill = [i for i in infos if i.num_prefill_tokens]
    decode = [i for i in infos if not i.num_prefill_tokens and i.num_seqs]
    return {
        "requests": len(reqs),
        "output_tokens": planned,
        "output_tokens_seen": toks,
        "wall_s": wall,
        "tokens_per_s": planned / wall,
        "steps": steps,
        "async_scheduling": async_scheduling,
        "preemptions": engine.scheduler.num_preemptions - preempted,
        # where the time goes: steps with prefill tokens run eagerly (no CUDA graph); `launch_s` is host time spent
        # in the runner (building inputs + launching, + waiting on the GPU in the synchronous mode)
        "prefill_steps": len(prefill),
        "prefill_steps_s": sum(i.step_seconds for i in prefill),
        "decode_steps": len(decode),
        "decode_steps_s": sum(i.step_seconds for i in decode),
        "launch_s": sum(i.forward_seconds for i in infos),
        "mean_decode_batch": sum(i.num_seqs for i in decode) / max(1, len(decode)),
    }


def profile_steps(
    engine, reqs: list[tuple[int, int, int]], async_scheduling: bool, warm: int = 24, n: int = 12
) -> dict:
    """Where a step's time goes, mid-run at full batch: `n` plain steps, `n` under cProfile (Python functions,
    host only), `n` under torch.profiler (host ops and device kernels). The requests left are aborted afterwards,
    whatever happens, so later runs start from an empty engine."""
    import cProfile
    import io
    import pstats

    from lorafleet.worker.engine.sequence import SamplingParams
    from torch.profiler import ProfilerActivity, profile

    engine.config.async_scheduling = async_scheduling
    gen = torch.Generator().manual_seed(0)
    ids = [f"prof{int(async_scheduling)}-{i}" for i in range(len(reqs))]
    cuda = engine.device.type == "cuda"
    out: dict = {"async_scheduling": async_scheduling, "steps": n}

    def steps() -> float:
        t = time.perf_counter()
        for _ in range(n):
            engine.step()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / n * 1e3

    try:
        for rid, (plen, olen, a) in zip(ids, reqs, strict=True):
            prompt = torch.randint(10, 380, (plen,), generator=gen).tolist()
            params = SamplingParams(temperature=0.0, max_tokens=olen, ignore_eos=True)
            engine.add_request(rid, prompt, params, f"ad{a}" if a >= 0 else None)
        for _ in range(warm):
            engine.step()
        out["batch"] = len(engine.scheduler.running)
        out["ms_per_step"] = steps()
        prof_py = cProfile.Profile()
        prof_py.enable()
        out["cprofile_ms_per_step"] = steps()
        prof_py.disable()
        buf = io.StringIO()
        pstats.Stats(prof_py, stream=buf).sort_stats("tottime").print_stats(25)
        out["cprofile_by_tottime"] = buf.getvalue()[-6000:]
        try:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts) as prof:
                out["torch_profiler_ms_per_step"] = steps()
            ka = prof.key_averages()
            out["torch_by_self_cpu"] = ka.table(sort_by="self_cpu_time_total", row_limit=20)
            if cuda:
                out["torch_by_self_device"] = ka.table(sort_by="self_cuda_time_total", row_limit=20)
        except Exception:  # noqa: BLE001 - e.g. no CUPTI: keep the rest
            out["torch_profiler_error"] = traceback.format_exc()
    finally:
        for rid in ids:
            engine.abort_request(rid)
        while engine.has_unfinished_requests():
            engine.step()
    return out


def run(
    root: Path,
    shape: dict,
    n_req: int,
    adapter_counts: list[int],
    max_num_seqs: int = 256,
    device: str = "cuda",
    modes: tuple[bool, ...] = (False,),
    slots: int = 128,
    distinct: int = 32,
    tiny: bool = False,
    on_run=None,
    profile_counts: tuple[int, ...] = (),
) -> dict:
    """One engine for the shape (max_loras = min(slots, most adapters)); for each adapter count and mode, a
    closed-loop batch of `n_req` greedy requests. Keys: `adapters_{n}` (sync; what engine_bench.py reads),
    `adapters_{n}_async`; counts above `slots` run over the slots (the host tier holds them all)."""
    from lorafleet.worker.config import EngineConfig
    from lorafleet.worker.engine.llm_engine import LLMEngine

    t0 = time.perf_counter()
    n_max = max(adapter_counts)
    base = write_base(root, shape)
    paths = write_adapters(root, shape, n_max, min(distinct, n_max), device)
    out: dict = {"build_s": time.perf_counter() - t0, "runs": {}}
    n_slots = max(1, min(slots, n_max))
    cfg = EngineConfig(
        model=str(base),
        dtype="bfloat16" if device == "cuda" else "float32",
        device=device,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=8192 if not tiny else 256,
        max_model_len=2048,
        max_loras=n_slots,
        max_cpu_loras=max(n_slots, n_max),
        max_lora_rank=RANK,
        adapter_roots=[str(root)],
        enforce_eager=device != "cuda",
        kv_cache_fraction=0.5,
    )
    t1 = time.perf_counter()
    with _random_weights():
        engine = LLMEngine(cfg)
    out["engine_start_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    for i, p in enumerate(paths):
        engine.load_adapter(f"ad{i}", str(p))
    out["adapter_register_s"] = time.perf_counter() - t2
    print(
        f"  built in {out['build_s']:.1f} s, engine up in {out['engine_start_s']:.1f} s, {len(paths)} adapters "
        f"registered in {out['adapter_register_s']:.1f} s",
        flush=True,
    )
    out["max_loras"] = n_slots
    for n in adapter_counts:
        reqs = _requests(n_req, n, tiny)
        for mode in modes:
            key = f"adapters_{n}" + ("_async" if mode else "")
            r = measure(engine, reqs, key, mode)
            out["runs"][key] = r
            over = f" over {n_slots} slots" if n > n_slots else ""
            print(
                f"  LLMEngine adapters={n}{over} async={mode}: {r['tokens_per_s']:.0f} tok/s "
                f"({r['wall_s']:.2f} s, {r['steps']} steps)",
                flush=True,
            )
            if on_run is not None:
                on_run(out)
        if n in profile_counts:
            for mode in modes:
                try:
                    prof = profile_steps(engine, reqs[:256], mode, *((2, 4) if tiny else (24, 12)))
                    out.setdefault("profile", {})[f"adapters_{n}" + ("_async" if mode else "")] = prof
                    print(f"  profiled adapters={n} async={mode}: {prof.get('ms_per_step', 0):.2f} ms/step", flush=True)
                except Exception:  # noqa: BLE001 - diagnostics only: never lose the measured runs
                    out.setdefault("profile_errors", []).append(traceback.format_exc())
            if on_run is not None:
                on_run(out)
    del engine
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


# ---- the JSON ----------------------------------------------------------------------------------------------------
def metrics_of(name: str, r: dict) -> dict[str, float]:
    """tokens/s per run, async/sync per adapter count, adapters/no-adapters per mode."""
    m: dict[str, float] = {}
    runs, slots = r["runs"], r.get("max_loras", 0)

    def label(n: int) -> str:
        return f"adapters_{n}_over_{slots}_slots" if n > slots else f"adapters_{n}"

    counts = sorted({int(k.split("_")[1]) for k in runs})
    for n in counts:
        for mode in ("sync", "async"):
            v = runs.get(f"adapters_{n}" + ("_async" if mode == "async" else ""))
            if v is not None:
                m[f"llm_engine_{name}_{label(n)}_{mode}_tok_s"] = v["tokens_per_s"]
        s, a = runs.get(f"adapters_{n}"), runs.get(f"adapters_{n}_async")
        if s and a:
            m[f"llm_engine_{name}_{label(n)}_async_vs_sync"] = a["tokens_per_s"] / s["tokens_per_s"]
    for n in counts:
        for suffix, mode in (("", "sync"), ("_async", "async")):
            v, b = runs.get(f"adapters_{n}{suffix}"), runs.get(f"adapters_0{suffix}")
            if n and v and b:
                m[f"llm_engine_{name}_{label(n)}_vs_0_{mode}"] = v["tokens_per_s"] / b["tokens_per_s"]
    return m


def device_info(device: str) -> dict:
    info = {"torch": torch.__version__, "device": device}
    if device == "cuda" and torch.cuda.is_available():
        info["name"] = torch.cuda.get_device_name(0)
        with contextlib.suppress(Exception):
            import triton

            info["triton"] = triton.__version__
            q = "--query-gpu=name,memory.total,driver_version,clocks.max.sm"
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", q, "--format=csv,noheader"], capture_output=True, text=True, timeout=20
            ).stdout.strip()
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/lf_llm_out")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model, few short requests (CPU smoke)")
    ap.add_argument("--shapes", default=None, help="comma list of 1b,8b (default both; tiny: one tiny model)")
    ap.add_argument("--adapters", default=None, help="adapter counts, 1B (default 0,32,128,512; tiny: 0,2,4,8)")
    ap.add_argument("--adapters-8b", default="0,32,128", help="512 needs ~43 GB of pinned host memory at 8B")
    ap.add_argument("--modes", default="sync,async")
    ap.add_argument("--slots", type=int, default=128, help="GPU adapter slots (max_loras)")
    ap.add_argument("--requests", type=int, default=None, help="requests per run (default 512 for 1B, 256 for 8B)")
    ap.add_argument("--work", default="/tmp/lf_llm_bench")
    ap.add_argument(
        "--profile", default="0", help="adapter counts whose steps are also profiled (1B only; '' for none)"
    )
    a = ap.parse_args(argv)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if a.tiny:
        torch.set_num_threads(1)  # tiny matrices: more threads only add OpenMP barriers on a shared machine
    modes = tuple(m == "async" for m in a.modes.split(","))
    result: dict = {
        "command": " ".join(sys.argv if argv is None else ["bench/engine_llm_bench.py", *argv]),
        "device": device_info(a.device),
        "commit": commit(),
        "metrics": {},
        "config": {
            "base_weights": "random N(0, 0.02), norms 1, generated on the device (safetensors loader bypassed)",
            "adapters": f"rank {RANK} on {'/'.join(TARGETS)}; 32 distinct, the rest hard links of them",
            "workload": "closed loop, greedy, ignore_eos, engine_sim decode_heavy mix (tiny: 8x/24x shorter)",
            "tiny": a.tiny,
        },
        "runs": {},
        "errors": {},
    }
    path = out_dir / "engine_llm_engine.json"

    def save() -> None:
        result["metrics"] = {k: v for name, r in result["runs"].items() for k, v in metrics_of(name, r).items()}
        path.write_text(json.dumps(result, indent=1, default=str))

    t_all = time.perf_counter()
    shapes = a.shapes or ("tiny" if a.tiny else "1b,8b")
    adapters = a.adapters or ("0,2,4,8" if a.tiny else "0,32,128,512")
    for name in shapes.split(","):
        counts = [int(x) for x in (a.adapters_8b if name == "8b" and not a.tiny else adapters).split(",")]
        shape = TINY if a.tiny else SHAPES[name]
        n_req = a.requests or (8 if a.tiny else 256 if name == "8b" else 512)
        work = Path(a.work) / name
        print(f"{name}: {n_req} requests per run, adapters {counts}, modes {a.modes}", flush=True)
        try:

            def on_run(r: dict, name: str = name) -> None:
                result["runs"][name] = r
                save()

            slots = min(a.slots, 4) if a.tiny else a.slots
            max_seqs = 16 if a.tiny else 256
            prof = tuple(int(x) for x in a.profile.split(",") if x) if name in ("1b", "tiny") else ()
            r = run(
                work,
                shape,
                n_req,
                counts,
                max_seqs,
                a.device,
                modes,
                slots,
                tiny=a.tiny,
                on_run=on_run,
                profile_counts=prof,
            )
            result["runs"][name] = r
        except Exception:  # noqa: BLE001 - keep the other shape
            result["errors"][name] = traceback.format_exc()
            traceback.print_exc()
        save()
    result["total_s"] = time.perf_counter() - t_all
    save()
    print(json.dumps(result["metrics"], indent=1))
    print(f"wrote {path}", flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
