"""Continual-learning GPU benchmarks (issue 5), on the real engine (`LLMEngine`) with a Llama-3.2-1B-shaped model
(`--shape 8b`: Llama-3.1-8B, where decode is bound by weight reads as in FlexLLM's setting; random bf16 weights,
built on the device; no checkpoint download) and a rank-16 adapter on q/k/v/o.

Keys (under `metrics`):
- activation_reuse_training_speedup: training tokens/s (completion tokens) when the prompt state comes from the
  activation stash recorded while serving (forward only the completion against it, stash brought back from host
  memory inside the timing) / a separate trainer that recomputes the forward over prompt + completion (full
  backprop), same GPU, same feedback, both on the co-serving job's training path (`GraphedTrainer`); the eager
  `LoRATrainer` ratio is in raw.reuse.
- recording_ttft_ratio: serving TTFT p50 with prefill recording on / off, same Poisson arrivals.
- coserve_finetune_retention_50 / _90: fine-tuning tokens/s while co-serving at 50% / 90% of the max inference load,
  divided by fine-tuning alone.
- coserve_p99_tpot_ratio: p99 per-request TPOT co-serving / inference alone, same arrivals (90% load).
- coserve_vs_timeslice_finetune_throughput: fine-tuning tokens/s of co-serving / of alternating 64 inference
  iterations with 64 fine-tuning iterations, same arrivals (90% load); both latency-target attainments reported.
  `_50` suffix: the same at 50% load (`--timeslice-loads 0.5,0.9`).
The co-serving job's TPOT target is 1.10 x the p99 TPOT of inference alone at the same arrivals.

Run on the GPU machine: `python bench/cl_gpu.py --out DIR` (with `lorafleet` installed, bench/common.py). CPU smoke:
`python bench/cl_gpu.py --device cpu --tiny`.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import llama_shapes
import torch
from common import commit
from lorafleet.worker.engine.plugin import IterationPlugin

ROOT = Path(__file__).resolve().parent.parent

_RUN = 0
# the shapes with a shorter context: the co-serving runs never go beyond 2048 tokens
SHAPES = {
    "1b": dict(llama_shapes.LLAMA_32_1B, max_position_embeddings=8192),
    "8b": dict(llama_shapes.LLAMA_31_8B, max_position_embeddings=8192),
}


class Cfg:
    def __init__(self, tiny: bool, device: str, shape: str = "1b") -> None:
        self.tiny = tiny
        self.shape = shape
        self.device = device
        gpu = device.startswith("cuda")
        self.budget = 256 if tiny else 2048
        self.max_seqs = 16 if tiny else 128
        self.inf_prompt = 32 if tiny else 256
        self.inf_out = 16 if tiny else 128
        self.ft_prompt = 48 if tiny else 512
        self.ft_completion = 16 if tiny else 128
        self.duration = 4.0 if tiny else 20.0
        self.reuse_samples = 16 if tiny else 96
        self.reuse_group = 4 if tiny else 16
        self.stash_bytes = (64 << 20) if tiny else (4 << 30)
        self.dtype = "float32" if not gpu else "bfloat16"
        self.async_scheduling = False  # engine switches the A/B flags set (make_engine)
        self.triton_elementwise = True


def build_checkpoint(cfg: Cfg, work: Path) -> Path:
    from lorafleet.worker.testing import TinyLlamaSpec, build_tiny_llama, build_tokenizer

    out = work / "model"
    if cfg.tiny:
        return build_tiny_llama(out, TinyLlamaSpec(hidden_size=128, intermediate_size=256, num_hidden_layers=4))
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True)
    tok = build_tokenizer(out)
    hf = LlamaConfig(
        **SHAPES[cfg.shape],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.02,
    )
    dtype = torch.get_default_dtype()
    try:  # built in bf16 directly: an 8B in fp32 first would take 32 GB for nothing
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(cfg.device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(hf)
    finally:
        torch.set_default_dtype(dtype)
    model.save_pretrained(str(out), safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    return out


def build_adapter(shape, root: Path, rank: int = 16) -> Path:
    from lorafleet.worker.training.versions import save_peft_adapter

    g = torch.Generator().manual_seed(1)
    w = {}
    for layer in range(shape.num_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            fin, fout = shape.proj_dims(proj)
            w[(layer, proj)] = (torch.randn(rank, fin, generator=g) * 0.02, torch.randn(fout, rank, generator=g) * 0.02)
    return save_peft_adapter(root / "ad", w, rank, 2 * rank, ["q_proj", "k_proj", "v_proj", "o_proj"])


def make_engine(cfg: Cfg, ckpt: Path, root: Path):
    from lorafleet.worker.config import EngineConfig
    from lorafleet.worker.engine.llm_engine import LLMEngine

    ec = EngineConfig(
        model=str(ckpt),
        device=cfg.device,
        dtype=cfg.dtype,
        max_num_batched_tokens=cfg.budget,
        max_num_seqs=cfg.max_seqs,
        adapter_roots=[str(root)],
        kv_cache_fraction=0.35,
        kv_cache_bytes=256 << 20,
        max_model_len=2048,
        async_scheduling=cfg.async_scheduling,
        triton_elementwise=cfg.triton_elementwise,
    )
    eng = LLMEngine(ec)
    return eng


def setup(cfg: Cfg, work: Path):
    """Checkpoint, engine and the rank-16 adapter "ad" loaded as v1 (what every co-serving bench starts from)."""
    ckpt = build_checkpoint(cfg, work)
    root = work / "adapters"
    root.mkdir()
    engine = make_engine(cfg, ckpt, root)
    build_adapter(engine.model.shape, root)
    engine.load_adapter("ad", str(root / "ad"), "v1")
    return engine, root


def make_job(engine, root: Path, name: str, record: bool, tpot_ms: float = 50.0, mode: str = "coserve"):
    from lorafleet.worker.training.job import ContinualLearningJob, JobSpec
    from lorafleet.worker.training.metrics import TrainingMetrics
    from lorafleet.worker.training.trainer import OptimConfig
    from lorafleet.worker.training.versions import PublishPolicy

    spec = JobSpec(
        name=name,
        adapter="ad",
        mode=mode,
        epochs=10_000,
        optim=OptimConfig(lr=1e-4, grad_accumulation=4),
        publish=PublishPolicy(every_steps=10**9),
        heldout_fraction=0.0,
        replay_ratio=0.0,
        tpot_ms=tpot_ms,
        min_share=0.05,
        record_activations=record,
        stash_bytes=engine_stash_bytes(engine),
        max_seq_tokens=4096,
        graphs=getattr(engine, "_bench_graphs", "auto"),
        placement=getattr(engine, "_bench_placement", "serving"),
        serving_sms=getattr(engine, "_bench_serving_sms", 16),
    )
    return ContinualLearningJob(spec, engine, root / "versions", {}, TrainingMetrics())


def engine_stash_bytes(engine) -> int:
    return getattr(engine, "_bench_stash_bytes", 64 << 20)


def feed(job, cfg: Cfg, n: int, seed: int) -> None:
    from lorafleet.worker.feedback.store import FeedbackSample

    rng = random.Random(seed)
    vocab = min(job.engine.model.shape.vocab_size, 30000)
    for i in range(n):
        p = [rng.randrange(10, vocab) for _ in range(cfg.ft_prompt)]
        c = [rng.randrange(10, vocab) for _ in range(cfg.ft_completion)]
        job.offer(FeedbackSample("ad", "pair", p, c, feedback_id=f"fb-{seed}-{i}", seq=i))


def sync(cfg: Cfg) -> None:
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------
def run_load(
    engine,
    cfg: Cfg,
    rate: float | None,
    seed: int,
    job=None,
    mode: str = "alone",
    record_job=None,
    slice_every=1,
    pause_s: float | None = None,
) -> dict:
    """Drives the engine with Poisson arrivals (rate req/s; None = closed loop of 4 x max_seqs requests) for
    cfg.duration seconds. mode: alone | coserve (iteration hook) | timeslice (64 inference / 64 training its;
    with pause_s, each training piece is a sleep that long instead: tells queueing from what training does to the
    GPU). Returns TTFT/TPOT lists, fine-tuning sequence tokens and the window length."""
    from lorafleet.worker.engine.sequence import SamplingParams
    from lorafleet.worker.training.coserve import coserve_iteration

    global _RUN
    _RUN += 1
    rng = random.Random(seed)
    vocab = min(engine.model.shape.vocab_size, 30000)
    if rate is None:
        arrivals = [0.0] * (4 * cfg.max_seqs)
    else:
        arrivals, t = [], 0.0
        while True:
            t += rng.expovariate(rate)
            if t > cfg.duration:
                break
            arrivals.append(t)
    prompts = [[rng.randrange(10, vocab) for _ in range(cfg.inf_prompt)] for _ in arrivals]
    params = SamplingParams(temperature=0.0, max_tokens=cfg.inf_out, ignore_eos=True)
    steps: list[tuple[int, int, int, float]] = []  # (seqs, prefill tokens, decode tokens, forward s) per step
    preempt0 = engine.scheduler.num_preemptions
    gc_s = [0.0, 0.0, 0.0]  # seconds in Python's collector by generation (a big heap makes gen-2 passes long)
    gc_t0 = [0.0]

    def gc_probe(phase: str, info: dict) -> None:
        if phase == "start":
            gc_t0[0] = time.perf_counter()
        else:
            gc_s[info["generation"]] += time.perf_counter() - gc_t0[0]

    gc.callbacks.append(gc_probe)
    train_s = 0.0  # wall time of the time-slicing loop's training pieces (and of idle fine-tuning)
    slices = 0  # time-slicing pieces run (trained or slept)
    pieces: list[tuple[float, float]] = []  # (units, seconds) of every co-serving training piece
    hook_s = [0.0, 0]  # host seconds in the co-serving hook over every iteration (planning included), calls

    def hook(info) -> None:
        h0 = time.perf_counter()
        used = coserve_iteration(engine, [job], info)
        dt = time.perf_counter() - h0
        hook_s[0] += dt
        hook_s[1] += 1
        if used:
            pieces.append((used, dt))

    coserving = mode == "coserve" and job is not None
    plugin = _LoadPlugin(steps, hook if coserving else None, graphed=coserving and job.asynchronous)
    engine.add_plugin(plugin)  # as the training service co-serves: after each step is queued (graphed) or settled
    seqs: dict[str, dict] = {}
    log_cursor = engine.request_tpots.count  # the engine's own per-request TPOTs (what the guard steers by)
    ft0 = job.sequence_tokens if job is not None else 0
    sync(cfg)
    t0 = time.perf_counter()
    i = 0
    iters = 0
    phase_train = False
    phase_left = 64
    step_s = 0.0  # wall time inside engine.step() (serving steps only: tells a slower step from a paused loop)
    window_end = None
    while True:
        now = time.perf_counter() - t0
        while i < len(arrivals) and arrivals[i] <= now:
            rid = f"run{_RUN}-{i}"
            engine.add_request(rid, prompts[i], params, "ad")
            seqs[rid] = {"arr": t0 + arrivals[i], "times": []}
            i += 1
        if rate is None and i == len(arrivals) and window_end is None:
            window_end = 0.0
        done = i == len(arrivals) and not engine.has_unfinished_requests()
        if done:
            break
        if mode == "timeslice" and phase_train:
            if phase_left % slice_every == 0 and pause_s is not None:
                time.sleep(pause_s)
                train_s += pause_s
                slices += 1
            elif phase_left % slice_every == 0 and job is not None:
                tt0 = time.perf_counter()
                job.work_idle(cfg.budget)
                sync(cfg)
                train_s += time.perf_counter() - tt0
                slices += 1
            phase_left -= 1
            if phase_left == 0:
                phase_train, phase_left = False, 64
            continue
        if engine.has_unfinished_requests():
            ts0 = time.perf_counter()
            outs = engine.step()
            iters += 1
            tnow = time.perf_counter()
            step_s += tnow - ts0
            for o in outs:
                if o.new_token_ids and o.request_id in seqs:
                    seqs[o.request_id]["times"].append(tnow)
            if mode == "timeslice":
                phase_left -= 1
                if phase_left == 0:
                    phase_train, phase_left = True, 64
        elif job is not None and mode in ("coserve", "alone_ft"):
            tt0 = time.perf_counter()
            job.work_idle(cfg.budget)  # idle: fine-tuning gets the whole budget
            sync(cfg)
            train_s += time.perf_counter() - tt0
        else:
            time.sleep(0.0002)
        if rate is not None and now > cfg.duration + 60:
            break
    elapsed = time.perf_counter() - t0
    gc.callbacks.remove(gc_probe)
    for rid in list(seqs):  # anything left (only after the drain limit) must not leak into the next run
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    ttft = [s["times"][0] - s["arr"] for s in seqs.values() if s["times"]]
    # per request (TTFT, TPOT; 0 for a single token; None: never started) for attainment of an absolute SLO
    slo_pairs = [
        (
            s["times"][0] - s["arr"] if s["times"] else None,
            (s["times"][-1] - s["times"][0]) / (len(s["times"]) - 1) if len(s["times"]) > 1 else 0.0,
        )
        for s in seqs.values()
    ]
    # (seconds from the start when the request ended, its TPOT) in end order: where in a run the misses are
    ended = sorted(
        (s["times"][-1] - t0, (s["times"][-1] - s["times"][0]) / (len(s["times"]) - 1))
        for s in seqs.values()
        if len(s["times"]) > 1
    )
    tpot = [t for _, t in ended]
    tpot_by_end = [(round(end, 3), round(t, 6)) for end, t in ended]
    engine_tpot = [t for _, t in engine.request_tpots.since(log_cursor)[0]]
    if job is not None:
        job.graphed.synchronize()
        job.drain()
    ft_tokens = (job.sequence_tokens - ft0) if job is not None else 0
    engine.remove_plugin(plugin)
    print(
        f"[run_load] mode={mode} rate={rate} every={slice_every} elapsed={elapsed:.1f}s iters={iters} "
        f"tpot_p50={pct(tpot, 0.5)} tpot_p99={pct(tpot, 0.99)} ft_tok/s={ft_tokens / elapsed:.0f} "
        f"depth={getattr(job.scheduler, 'depth', None) if job is not None else None}",
        file=sys.stderr,
        flush=True,
    )
    return {
        "requests": len(seqs),
        "elapsed_s": elapsed,
        "req_per_s": len(seqs) / elapsed,
        "ttft": ttft,
        "tpot": tpot,
        "slo_pairs": slo_pairs,
        "engine_tpot": engine_tpot,
        "tpot_by_end": tpot_by_end,
        "ft_tokens": ft_tokens,
        "ft_tokens_per_s": ft_tokens / elapsed,
        "iterations": iters,
        "step_seconds_mean": step_s / max(1, iters),
        "train_seconds": train_s,
        "timeslice_pieces": slices,
        "preemptions": engine.scheduler.num_preemptions - preempt0,
        "gc_seconds": gc_s,
        "step_mix": _mix(steps),
        "steps": steps,
        "pieces": len(pieces),
        "piece_units_mean": sum(u for u, _ in pieces) / len(pieces) if pieces else 0.0,
        "piece_seconds_mean": sum(t for _, t in pieces) / len(pieces) if pieces else 0.0,
        "piece_seconds_total": sum(t for _, t in pieces),
        "hook_seconds_total": hook_s[0],
        "hook_us_per_call": 1e6 * hook_s[0] / max(1, hook_s[1]),
    }


class _LoadPlugin(IterationPlugin):
    """The engine plugin of one load run: records each step's mix and, co-serving, runs the job's pieces where the
    training service does (after the step is queued for graphed pieces, after it is settled for eager ones)."""

    def __init__(self, steps: list, coserve, graphed: bool) -> None:
        self.steps, self.coserve, self.graphed = steps, coserve, graphed

    def after_launch(self, info) -> None:
        if self.coserve is not None and self.graphed:
            self.coserve(info)

    def after_step(self, info) -> None:
        self.steps.append((info.num_seqs, info.num_prefill_tokens, info.num_decode_tokens, info.forward_seconds))
        if self.coserve is not None and not self.graphed:
            self.coserve(info)


def _recording(engine, stash):
    """A plugin that records every prefill of adapter "ad" into `stash` (what a recording job does)."""
    from lorafleet.worker.training.coserve import CoServePlugin
    from lorafleet.worker.training.stash import PrefillRecorder

    lookup = PrefillRecorder(lambda name: (stash, lambda v: 0) if name == "ad" else None, engine.model.shape.num_layers)
    return CoServePlugin([], recorder=lookup)


def _mix(steps: list[tuple[int, int, int, float]]) -> dict:
    """What the serving steps held on average: tells a bigger batch (a queue built up) from a slower step."""
    n = max(1, len(steps))
    return {
        "seqs_mean": sum(s[0] for s in steps) / n,
        "prefill_tokens_mean": sum(s[1] for s in steps) / n,
        "decode_tokens_mean": sum(s[2] for s in steps) / n,
        "forward_seconds_mean": sum(s[3] for s in steps) / n,
        "steps_with_prefill": sum(1 for s in steps if s[1]) / n,
    }


def slo_attainment(pairs: list, tpot_s: float, ttft_s: float) -> float:
    """The share of requests that met both parts of an absolute SLO (a request that never started missed it)."""
    ok = sum(1 for ttft, tpot in pairs if ttft is not None and ttft <= ttft_s and tpot <= tpot_s)
    return ok / max(1, len(pairs))


def meets_slo(r: dict, tpot_s: float, ttft_s: float) -> bool:
    """p99 TPOT and p99 TTFT of a run within the SLO, and every request served."""
    started = [t for t, _ in r["slo_pairs"] if t is not None]
    return len(started) == len(r["slo_pairs"]) > 0 and pct(r["tpot"], 0.99) <= tpot_s and pct(started, 0.99) <= ttft_s


def bench_slo(engine, cfg: Cfg, job, alone: float, r_closed: float, tpot_s: float, ttft_s: float) -> dict:
    """Co-serving under an absolute interactive SLO (FlexLLM's terms): the max load inference alone serves within
    p99 TPOT <= `tpot_s` and p99 TTFT <= `ttft_s` (bisection below the closed-loop rate), then at 50% and 90% of
    it inference alone and co-serving on the same arrivals. The job's own target is the strict relative one,
    1.10 x inference alone's p99 TPOT at that load (capped at the SLO's TPOT)."""
    out: dict = {"slo": {"tpot_p99_s": tpot_s, "ttft_p99_s": ttft_s}, "closed_loop_req_per_s": r_closed, "search": []}
    lo, hi = 0.0, r_closed
    for i in range(5):  # the closed-loop rate first, then halvings of the bracket
        rate = hi if i == 0 else (lo + hi) / 2
        r = run_load(engine, cfg, rate, seed=40 + i)
        ok = meets_slo(r, tpot_s, ttft_s)
        started = [t for t, _ in r["slo_pairs"] if t is not None]
        out["search"].append(
            {"rate": rate, "meets": ok, "tpot_p99": pct(r["tpot"], 0.99), "ttft_p99": pct(started, 0.99)}
        )
        if ok:
            lo = rate
            if i == 0:
                break
        else:
            hi = rate
    r_slo = lo if lo > 0 else out["search"][-1]["rate"]
    out["max_load_req_per_s"] = r_slo
    out["max_load_found"] = lo > 0
    for load in (0.5, 0.9):
        rate = load * r_slo
        key = f"{int(load * 100)}"
        inf = run_load(engine, cfg, rate, seed=60 + int(load * 10))
        target = min(tpot_s, 1.10 * pct(inf["tpot"], 0.99))
        job.scheduler.retarget(target)
        co = run_load(engine, cfg, rate, seed=60 + int(load * 10), job=job, mode="coserve")
        att_inf = slo_attainment(inf["slo_pairs"], tpot_s, ttft_s)
        att_co = slo_attainment(co["slo_pairs"], tpot_s, ttft_s)
        out[key] = {
            "rate": rate,
            "job_tpot_target_s": target,
            "inference_alone": _summ(inf),
            "coserve": _summ(co),
            "slo_attainment_alone": att_inf,
            "slo_attainment_coserve": att_co,
            "guard_aim": job.scheduler.guard.aim,
        }
        out[f"coserve_slo_retention_{key}"] = co["ft_tokens_per_s"] / alone
        out[f"coserve_slo_attainment_ratio_{key}"] = att_co / att_inf if att_inf > 0 else None
        out[f"coserve_slo_p99_tpot_ratio_{key}"] = pct(co["tpot"], 0.99) / pct(inf["tpot"], 0.99)
    return out


def attainment(tpots: list[float], target_s: float) -> float:
    """The share of requests whose TPOT met the target."""
    return sum(t <= target_s for t in tpots) / max(1, len(tpots))


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def finetune_alone(engine, job, cfg: Cfg) -> float:
    """Fine-tuning tokens/s with the whole budget every iteration and no inference."""
    for _ in range(8):  # warm-up (graph captures, allocator)
        job.work_idle(cfg.budget)
        sync(cfg)
    job.drain()
    t0 = time.perf_counter()
    n0 = job.sequence_tokens
    while time.perf_counter() - t0 < cfg.duration / 2:
        job.work_idle(cfg.budget)
        sync(cfg)
    job.drain()
    rate = (job.sequence_tokens - n0) / (time.perf_counter() - t0)
    print(f"[finetune_alone] {rate:.0f} tok/s", file=sys.stderr, flush=True)
    return rate


# ---------------------------------------------------------------------------------------------------------------
def bench_reuse(engine, cfg: Cfg, root: Path) -> dict:
    """Stash reuse vs a trainer that recomputes the forward (same samples, same steps), on the path a co-serving
    job trains with on this device: `GraphedTrainer` micro-batches (packed samples, stashed prompt K/V as constant
    prefix keys; CUDA graphs on a GPU). The eager `LoRATrainer` (one sample's prefix at a time) is reported too."""
    from lorafleet.worker.engine.sequence import SamplingParams
    from lorafleet.worker.training.graphed import GraphedTrainer
    from lorafleet.worker.training.lora_context import TrainableLoRA
    from lorafleet.worker.training.stash import ActivationStash
    from lorafleet.worker.training.trainer import LoRATrainer, OptimConfig, TrainSample

    rng = random.Random(3)
    vocab = min(engine.model.shape.vocab_size, 30000)
    n = cfg.reuse_samples
    prompts = [[rng.randrange(10, vocab) for _ in range(cfg.ft_prompt)] for _ in range(n)]
    stash = ActivationStash(cfg.stash_bytes, engine.device)
    rec = _recording(engine, stash)
    engine.add_plugin(rec)
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), ["ad"] * n)
    engine.remove_plugin(rec)
    completions = [[rng.randrange(10, vocab) for _ in range(cfg.ft_completion)] for _ in range(n)]
    group = cfg.reuse_group
    # taken once; loaded from the host arena inside every timed reuse step (nothing records meanwhile, so the
    # arena ranges stay valid for the second path)
    entries = {j: stash.take(outs[j].request_id) for j in range(n)}

    def reuse_samples(idx):
        out = []
        for j in idx:
            kv = stash.load(entries[j], engine.device, engine.dtype)  # host -> device: part of the reuse cost
            m = len(prompts[j]) - 1
            out.append(TrainSample(prompts[j], completions[j], prefix_kv=[(k[:m], v[:m]) for k, v in kv]))
        return out

    def full_samples(idx):
        return [TrainSample(prompts[j], completions[j]) for j in idx]

    def trainer():
        lora = TrainableLoRA.from_peft(engine.model.shape, engine.store.current("ad").path, device=engine.device)
        optim = OptimConfig(grad_accumulation=group)
        return LoRATrainer(engine.model, lora, optim, compute_dtype=engine.dtype)

    graphed = GraphedTrainer(trainer(), max_tokens=1024, max_prefix=4096)

    def graphed_step(samples):
        tokens = sum(s.loss_tokens for s in samples)
        for mb in graphed.pack(samples, tokens):
            graphed.launch(mb)
        graphed.launch_step()

    eager = trainer()
    timed = [list(range(s, s + group)) for s in range(group, n - group + 1, group)]
    tokens = sum(cfg.ft_completion for idx in timed for _ in idx)
    res = {
        "stash_recorded": stash.counters.recorded,
        "tokens": tokens,
        "prompt_tokens": cfg.ft_prompt,
        "completion_tokens": cfg.ft_completion,
        "samples_per_step": group,
        "steps_timed": len(timed),
    }
    for name, step in (("graphed", graphed_step), ("eager", eager.train_step)):

        def seconds(make, step=step) -> float:
            """Wall time of every timed step on `make(idx)` samples, the GPU included (graphs launch async)."""
            t0 = time.perf_counter()
            for idx in timed:
                step(make(idx))
            graphed.synchronize()
            sync(cfg)
            return time.perf_counter() - t0

        step(full_samples(range(group)))  # warm-up both paths (graph captures, kernels, allocator)
        step(reuse_samples(range(group)))
        graphed.synchronize()
        sync(cfg)
        t_full, t_reuse = seconds(full_samples), seconds(reuse_samples)
        res[f"{name}_full_recompute_tokens_per_s"] = tokens / t_full
        res[f"{name}_reuse_tokens_per_s"] = tokens / t_reuse
        res[f"{name}_speedup"] = t_full / t_reuse
        print(f"[reuse] {name}: full {tokens / t_full:.0f} tok/s, reuse {tokens / t_reuse:.0f} tok/s", file=sys.stderr)
    res["speedup"] = res["graphed_speedup"]
    return res


def bench_recording(engine, cfg: Cfg, root: Path, rate: float) -> dict:
    from lorafleet.worker.training.stash import ActivationStash

    off = run_load(engine, cfg, rate, seed=11)
    stash = ActivationStash(cfg.stash_bytes, engine.device)
    rec = _recording(engine, stash)
    engine.add_plugin(rec)
    on = run_load(engine, cfg, rate, seed=11)
    engine.remove_plugin(rec)
    return {
        "ttft_p50_off": pct(off["ttft"], 0.5),
        "ttft_p50_on": pct(on["ttft"], 0.5),
        "ratio": pct(on["ttft"], 0.5) / pct(off["ttft"], 0.5),
        "recorded": stash.counters.recorded,
        "evicted": stash.counters.evicted,
        "skipped": stash.counters.skipped,
        "rate": rate,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument(
        "--phase", action="append", default=None, help="reuse | recording | coserve | slo (default: all but slo)"
    )
    ap.add_argument("--slo-tpot-ms", type=float, default=50.0, help="slo phase: p99 TPOT bound (ms)")
    ap.add_argument("--slo-ttft-s", type=float, default=1.0, help="slo phase: p99 TTFT bound (s)")
    ap.add_argument("--duration", type=float, default=None, help="seconds of arrivals per load run")
    ap.add_argument(
        "--graphs",
        default="auto",
        help="co-serving pieces: auto | on (CUDA graphs on a GPU) | off (the same pieces, eager)",
    )
    ap.add_argument("--placement", default="serving", choices=("serving", "partition"), help="coServing.placement")
    ap.add_argument("--serving-sms", type=int, default=16, help="SMs kept from training with --placement partition")
    ap.add_argument("--out-name", default=None, help="result file name (default cl_gpu.json)")
    ap.add_argument("--async-scheduling", action="store_true", help="engine overlaps host work with the GPU step")
    ap.add_argument("--no-guard", action="store_true", help="co-serving without the TPOT guard (slo.py): an A/B")
    ap.add_argument("--no-triton-elementwise", action="store_true", help="torch RMSNorm/rotary/SiLU (an A/B)")
    ap.add_argument("--no-timeslice", action="store_true", help="skip the time-slicing ladder (a short co-serving run)")
    ap.add_argument("--max-load", type=float, default=None, help="req/s taken as the max load (default: measured)")
    ap.add_argument("--timeslice-loads", default="0.9", help="loads (of 0.5,0.9) that get a time-slicing ladder")
    ap.add_argument("--shape", default="1b", choices=tuple(SHAPES), help="Llama-3.2-1B or Llama-3.1-8B shape")
    args = ap.parse_args(argv)
    phases = args.phase or ["reuse", "recording", "coserve"]
    if args.tiny and "slo" in phases:
        cfg_note = "tiny CPU smoke: the SLO is the bounds given, not an interactive one"
    else:
        cfg_note = None
    if args.device == "cpu":
        torch.set_num_threads(2)
    cfg = Cfg(args.tiny, args.device, args.shape)
    cfg.async_scheduling = args.async_scheduling
    cfg.triton_elementwise = not args.no_triton_elementwise
    if args.duration:
        cfg.duration = args.duration
    work = Path(tempfile.mkdtemp(prefix="cl-gpu-"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "command": " ".join(["bench/cl_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": _device(args.device),
        "commit": commit(),
        "config": {k: v for k, v in vars(cfg).items()},
        "metrics": {},
        "note": cfg_note,
        "raw": {},
        "errors": {},
    }
    out_file = out_dir / (args.out_name or ("cl_gpu_tiny.json" if args.tiny else "cl_gpu.json"))

    def save() -> None:
        out_file.write_text(json.dumps(result, indent=1, default=str))

    t_all = time.perf_counter()
    engine, root = setup(cfg, work)
    engine._bench_stash_bytes = cfg.stash_bytes
    engine._bench_graphs = args.graphs
    engine._bench_placement = args.placement
    engine._bench_serving_sms = args.serving_sms
    from lorafleet.worker.gpu import prioritise_serving_stream
    from lorafleet.worker.training.slo import GuardConfig

    prioritise_serving_stream(engine.device)  # as the worker's engine thread does
    from lorafleet.worker.main import freeze_startup_heap

    freeze_startup_heap()  # as `lorafleet worker` does once the engine is built
    result["raw"]["setup_s"] = time.perf_counter() - t_all
    m = result["metrics"]

    if "reuse" in phases:
        try:
            r = bench_reuse(engine, cfg, root)
            result["raw"]["reuse"] = r
            m["activation_reuse_training_speedup"] = r["speedup"]
        except Exception:  # noqa: BLE001 - keep the other phases
            result["errors"]["reuse"] = traceback.format_exc()
        save()

    # max inference load (closed loop), shared by the phases below
    run_load(engine, cfg, None, seed=1)  # warm-up (CUDA graphs, allocator)
    closed = run_load(engine, cfg, None, seed=2)
    result["raw"]["measured_max_load_req_per_s"] = closed["req_per_s"]
    # a given max load keeps the arrival rates equal across A/B runs (the closed-loop measure moved 105-117 req/s)
    r_max = args.max_load or closed["req_per_s"]
    result["raw"]["max_load_req_per_s"] = r_max
    save()

    if "recording" in phases:
        try:
            r = bench_recording(engine, cfg, root, 0.5 * r_max)
            result["raw"]["recording"] = r
            m["recording_ttft_ratio"] = r["ratio"]
        except Exception:  # noqa: BLE001
            result["errors"]["recording"] = traceback.format_exc()
        save()

    if "slo" in phases:
        try:
            job = make_job(engine, root, "ft-slo", record=False)
            feed(job, cfg, 256, seed=5)
            alone = finetune_alone(engine, job, cfg)
            r = bench_slo(engine, cfg, job, alone, closed["req_per_s"], args.slo_tpot_ms / 1000.0, args.slo_ttft_s)
            r["finetune_alone_tokens_per_s"] = alone
            result["raw"]["slo"] = r
            for key in ("50", "90"):
                m[f"coserve_slo_retention_{key}"] = r[f"coserve_slo_retention_{key}"]
                m[f"coserve_slo_attainment_ratio_{key}"] = r[f"coserve_slo_attainment_ratio_{key}"]
                m[f"coserve_slo_p99_tpot_ratio_{key}"] = r[f"coserve_slo_p99_tpot_ratio_{key}"]
            m["coserve_slo_max_load_req_per_s"] = r["max_load_req_per_s"]
            job.stop()
        except Exception:  # noqa: BLE001
            result["errors"]["slo"] = traceback.format_exc()
        save()

    if "coserve" in phases:
        try:
            job = make_job(engine, root, "ft", record=False)
            raw_cfg = {
                "min_share": job.scheduler.cfg.min_share,
                "graphs": job.graphed.use_graphs,
                "placement": job.graphed.stream_mode,
            }
            feed(job, cfg, 256, seed=5)
            alone = finetune_alone(engine, job, cfg)
            raw = {"finetune_alone_tokens_per_s": alone, "share_config": raw_cfg}
            for load in (0.5, 0.9):
                rate = load * r_max
                inf = run_load(engine, cfg, rate, seed=20 + int(load * 10))
                target_s = 1.10 * pct(inf["tpot"], 0.99)
                # each load starts as a job started there with this target (a GPU budget left from fine-tuning
                # alone against the default 50 ms target bursts the first second); the guard's cursor at "now"
                if args.no_guard:
                    job.scheduler.cfg.guard = GuardConfig(min_samples=1 << 30)
                job.scheduler.retarget(target_s)
                co = run_load(engine, cfg, rate, seed=20 + int(load * 10), job=job, mode="coserve")
                key = f"{int(load * 100)}"
                att_inf = attainment(inf["tpot"], target_s)
                att_co = attainment(co["tpot"], target_s)
                raw[key] = {
                    "rate": rate,
                    "tpot_target_s": target_s,
                    "inference_alone": _summ(inf),
                    "coserve": _summ(co),
                    "attainment_alone": att_inf,
                    "attainment_coserve": att_co,
                    "final_share": job.scheduler.share,
                    "guard": {
                        "aim": job.scheduler.guard.aim,
                        "decisions": job.scheduler.guard.decisions,
                        "last_ratio": job.scheduler.guard.last_quantile,
                        "history": [[round(x, 4) for x in h] for h in job.scheduler.guard.history],
                    },
                    "graph_replays": job.graphed.graph_replays,
                    "eager_runs": job.graphed.eager_runs,
                }
                m[f"coserve_finetune_retention_{key}"] = co["ft_tokens_per_s"] / alone
                if load == 0.9:
                    m["coserve_p99_tpot_ratio"] = pct(co["tpot"], 0.99) / pct(inf["tpot"], 0.99)
                else:
                    m["coserve_p99_tpot_ratio_50"] = pct(co["tpot"], 0.99) / pct(inf["tpot"], 0.99)
                if not args.no_timeslice and f"{load:g}" in args.timeslice_loads.split(","):
                    suffix = "" if load == 0.9 else f"_{key}"
                    ladder = timeslice_ladder(
                        engine, cfg, job, rate, seed=20 + int(load * 10), target_s=target_s, att_co=att_co
                    )
                    raw[key]["timeslice_ladder"] = ladder
                    first, matched = ladder[0], ladder[-1]
                    m[f"coserve_vs_timeslice_raw_finetune_throughput{suffix}"] = (
                        co["ft_tokens_per_s"] / first["ft_tokens_per_s"] if first["ft_tokens_per_s"] > 0 else None
                    )
                    if matched["attainment"] >= att_co - 0.02 and matched["ft_tokens_per_s"] > 0:
                        m[f"coserve_vs_timeslice_finetune_throughput{suffix}"] = (
                            co["ft_tokens_per_s"] / matched["ft_tokens_per_s"]
                        )
                    else:  # even one piece per 64 fine-tuning iterations misses co-serving's attainment
                        m[f"coserve_vs_timeslice_finetune_throughput{suffix}"] = None
                        raw[key]["timeslice_note"] = "no time-slice setting reached co-serving's attainment"
                result["raw"]["coserve"] = raw
                save()
        except Exception:  # noqa: BLE001
            result["errors"]["coserve"] = traceback.format_exc()
        save()
    result["raw"]["total_s"] = time.perf_counter() - t_all
    save()
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result["metrics"], indent=1))
    if result["errors"]:
        print(json.dumps(result["errors"], indent=1), file=sys.stderr)
    return 0


def timeslice_ladder(engine, cfg: Cfg, job, rate: float, seed: int, target_s: float, att_co: float) -> list:
    """Time-slicing at equal latency-target attainment: 64 inference iterations, then 64 fine-tuning iterations
    that train on every k-th one; from the densest k down until the attainment reaches co-serving's."""
    ladder = []
    for k in (1, 4, 16, 64):
        ts = run_load(engine, cfg, rate, seed=seed, job=job, mode="timeslice", slice_every=k)
        att_ts = attainment(ts["tpot"], target_s)
        ladder.append({"every": k, "attainment": att_ts, **_summ(ts)})
        if att_ts >= att_co - 0.02:
            break
    return ladder


def _summ(r: dict) -> dict:
    return {
        "requests": r["requests"],
        "elapsed_s": r["elapsed_s"],
        "ttft_p50": pct(r["ttft"], 0.5),
        "tpot_p50": pct(r["tpot"], 0.5),
        "tpot_p99": pct(r["tpot"], 0.99),
        "ttft_p99": pct(r["ttft"], 0.99),
        "engine_tpot_p99": pct(r["engine_tpot"], 0.99),
        "engine_tpot_count": len(r["engine_tpot"]),
        "tpot_by_end": r["tpot_by_end"],
        "ft_tokens_per_s": r["ft_tokens_per_s"],
        "iterations": r["iterations"],
        "step_seconds_mean": r["step_seconds_mean"],
        "train_seconds": r["train_seconds"],
        "preemptions": r["preemptions"],
        "gc_seconds": r["gc_seconds"],
        "step_mix": r["step_mix"],
        **{
            k: r[k]
            for k in (
                "pieces",
                "piece_units_mean",
                "piece_seconds_mean",
                "piece_seconds_total",
                "hook_seconds_total",
                "hook_us_per_call",
            )
        },
    }


def _device(device: str) -> dict:
    d = {"torch": torch.__version__, "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        d["name"] = torch.cuda.get_device_name(0)
    return d


if __name__ == "__main__":
    raise SystemExit(main())
