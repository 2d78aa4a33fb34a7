"""Throughput of the real `LLMEngine` (worker/engine/llm_engine.py) on a GPU: the whole serving loop (scheduler,
block manager, adapter store, sampler, detokenizer, CUDA-graph decode) over a Llama-3.2-1B-shaped random checkpoint
with rank-16 PEFT adapters on all 7 projections.

Why next to `engine_bench.py`: that one measures the kernels and a minimal driver; this one measures what a
worker pod actually runs, so the gap between the two is the cost of the engine's Python loop. The checkpoint and
adapters are written in HF/PEFT format first (safetensors) and loaded through the engine's own loaders.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_checkpoint(
    root: Path, shape: dict, n_adapters: int, rank: int, device: str = "cuda"
) -> tuple[Path, list[Path]]:
    """Random bf16 base + `n_adapters` PEFT adapters with random A and B (std chosen so outputs stay finite)."""
    from lorafleet.worker.testing import build_tokenizer
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base = root / "base"
    base.mkdir(parents=True, exist_ok=True)
    build_tokenizer(base, vocab_size=384)
    cfg = LlamaConfig(**shape)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(str(base), safe_serialization=True)
    lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    g = torch.Generator(device=device).manual_seed(0)
    paths = []
    for i in range(n_adapters):
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    p.normal_(0.0, 0.02, generator=g)
        out = root / f"adapter{i}"
        peft_model.save_pretrained(str(out), safe_serialization=True)
        meta = json.loads((out / "adapter_config.json").read_text())
        meta["base_model_name_or_path"] = str(base)
        (out / "adapter_config.json").write_text(json.dumps(meta))
        paths.append(out)
    del peft_model, model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return base, paths


def run(
    root: Path, shape: dict, n_req: int, adapter_counts: list[int], max_num_seqs: int = 256, device: str = "cuda"
) -> dict:
    from lorafleet.worker.config import EngineConfig
    from lorafleet.worker.engine.llm_engine import LLMEngine
    from lorafleet.worker.engine.sequence import SamplingParams

    from bench.engine_sim import make_requests

    t0 = time.perf_counter()
    n_max = max(adapter_counts)
    base, paths = build_checkpoint(root, shape, n_max, 16, device)
    out: dict = {"build_s": time.perf_counter() - t0, "runs": {}}
    cfg = EngineConfig(
        model=str(base),
        dtype="bfloat16",
        device=device,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=8192,
        max_model_len=2048,
        max_loras=max(1, n_max),
        max_cpu_loras=max(1, n_max),
        max_lora_rank=16,
        adapter_roots=[str(root)],
        enforce_eager=device != "cuda",
        kv_cache_fraction=0.5,
    )
    t1 = time.perf_counter()
    engine = LLMEngine(cfg)
    out["engine_start_s"] = time.perf_counter() - t1
    for i, p in enumerate(paths):
        engine.load_adapter(f"ad{i}", str(p))
    gen = torch.Generator().manual_seed(0)
    for n in adapter_counts:
        reqs = make_requests(n_req, "decode_heavy", n, seed=1, max_len=2048)
        prompts = [torch.randint(10, 380, (r.plen,), generator=gen).tolist() for r in reqs]
        names = [f"ad{r.adapter}" if n else None for r in reqs]
        # warm-up: a few requests through the same paths (Triton compiles, graph sizes)
        engine.generate(prompts[:8], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), names[:8])
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        ids = [f"b{n}-{i}" for i in range(len(reqs))]
        for i, r in enumerate(reqs):
            engine.add_request(
                ids[i], prompts[i], SamplingParams(temperature=0.0, max_tokens=r.olen, ignore_eos=True), names[i]
            )
        toks = 0
        steps = 0
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    toks += len(o.output_token_ids)
            steps += 1
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        planned = sum(r.olen for r in reqs)
        out["runs"][f"adapters_{n}"] = {
            "requests": len(reqs),
            "output_tokens": planned,
            "output_tokens_seen": toks,
            "wall_s": wall,
            "tokens_per_s": planned / wall,
            "steps": steps,
        }
        print(f"  LLMEngine 1B adapters={n}: {planned / wall:.0f} tok/s ({wall:.2f} s, {steps} steps)", flush=True)
    return out
