"""Activation reuse against the real serving engine: what prefill records equals a recomputation, the gradients
from reused prompt state equal the recomputed ones at an unchanged version, and stale stashes are recomputed or
dropped (counted)."""

from __future__ import annotations

import pytest
import torch
from lorafleet.worker.config import EngineConfig
from lorafleet.worker.engine.llm_engine import LLMEngine
from lorafleet.worker.engine.sequence import SamplingParams
from lorafleet.worker.feedback.store import FeedbackSample
from lorafleet.worker.testing import build_peft_adapter
from lorafleet.worker.training.coserve import CoServePlugin
from lorafleet.worker.training.job import ContinualLearningJob, JobSpec
from lorafleet.worker.training.lora_context import TrainableLoRA
from lorafleet.worker.training.metrics import TrainingMetrics
from lorafleet.worker.training.stash import ActivationStash, PrefillRecorder
from lorafleet.worker.training.trainer import LoRATrainer, OptimConfig, TrainSample

PROMPT_A = list(range(10, 47))  # 37 tokens: chunked over several steps with the small budget below
PROMPT_B = list(range(100, 120))


@pytest.fixture()
def engine(tmp_path, tiny_dir):
    root = tmp_path / "adapters"
    build_peft_adapter(root / "ad", tiny_dir, rank=4, alpha=8, seed=5, std=0.1)
    build_peft_adapter(root / "other", tiny_dir, rank=4, alpha=8, seed=6, std=0.1)
    cfg = EngineConfig(
        model=str(tiny_dir),
        device="cpu",  # fp32 numerics against the CPU trainer (the GPU machine would pick cuda)
        max_num_batched_tokens=16,
        kv_cache_bytes=8 << 20,
        adapter_roots=[str(root)],
    )
    eng = LLMEngine(cfg)
    eng.load_adapter("ad", str(root / "ad"), "v1")
    eng.load_adapter("other", str(root / "other"), "v1")
    return eng


def _recording(engine, lookup):
    """Serves the mixed batch below with a plugin that records the prompts `lookup` asks for (as a job's does)."""
    plugin = CoServePlugin([], recorder=PrefillRecorder(lookup, engine.model.shape.num_layers))
    engine.add_plugin(plugin)
    try:
        return engine.generate(
            [PROMPT_B, PROMPT_A, PROMPT_B], SamplingParams(temperature=0.0, max_tokens=3), ["other", "ad", "ad"]
        )
    finally:
        engine.remove_plugin(plugin)


def _serve(engine, stash):
    # a mixed batch: the recorded adapter's prompt shares chunked-prefill steps with another adapter's request
    return _recording(engine, lambda name: (stash, lambda v: 0) if name == "ad" else None)


def test_recorded_prompt_state_equals_recomputation_and_gives_same_grads(engine, tmp_path):
    stash = ActivationStash(8 << 20)
    outs = _serve(engine, stash)
    assert stash.counters.recorded == 2  # the two "ad" requests, not the "other" one
    rid = outs[1].request_id
    entry = stash.take(rid)
    assert entry is not None and entry.tokens() == len(PROMPT_A) and len(entry.k[0]) >= 3  # recorded in chunks
    kv = stash.load(entry, "cpu", torch.float32)

    lora = TrainableLoRA.from_peft(engine.model.shape, engine.store.current("ad").path)
    trainer = LoRATrainer(engine.model, lora, OptimConfig(max_grad_norm=None))
    recomputed = trainer.prompt_kv(PROMPT_A)
    n = len(PROMPT_A) - 1
    for (k, v), (rk, rv) in zip(kv, recomputed, strict=True):
        torch.testing.assert_close(k[:n], rk, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v[:n], rv, rtol=1e-5, atol=1e-5)

    completion = outs[1].output_token_ids
    reused = TrainSample(PROMPT_A, completion, prefix_kv=[(k[:n], v[:n]) for k, v in kv])
    trainer.accumulate([reused], len(completion))
    g_reused = trainer.grads()
    trainer.opt.zero_grad(set_to_none=True)
    trainer.accumulate([TrainSample(PROMPT_A, completion, prefix_kv=recomputed)], len(completion))
    g_recomputed = trainer.grads()
    for key in g_reused:
        torch.testing.assert_close(g_reused[key][0], g_recomputed[key][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g_reused[key][1], g_recomputed[key][1], rtol=1e-4, atol=1e-6)
    assert float(g_reused[(1, "q_proj")][1].abs().sum()) > 0


@pytest.mark.parametrize("policy", ["recompute", "drop"])
def test_stale_stash_is_recomputed_or_dropped_and_counted(engine, tmp_path, policy):
    spec = JobSpec(
        name="j",
        adapter="ad",
        record_activations=True,
        max_staleness=2,
        stale_policy=policy,
        replay_ratio=0.0,
        heldout_fraction=0.0,
        epochs=1,
        optim=OptimConfig(grad_accumulation=1),
    )
    metrics = TrainingMetrics()
    job = ContinualLearningJob(spec, engine, tmp_path / "versions", {}, metrics)
    outs = _serve_with_job(engine, job)
    fresh, stale = outs[1], outs[2]
    job.offer(_fb(fresh))
    job.work_idle(10_000)  # one optimizer step, from the fresh stash
    assert job.stash.counters.reused == 1 and job.trainer.step == 1
    job.trainer.step = 10  # the adapter moved on: the other stash is now 10 steps old (> 2)
    job.offer(_fb(stale))
    job.work_idle(10_000)
    c = job.stash.counters
    if policy == "recompute":
        assert c.recomputed == 1 and c.dropped == 0 and job.trainer.step == 11
    else:
        assert c.dropped == 1 and c.recomputed == 0 and job.trainer.step == 10
    assert metrics.stash_events.labels(policy + ("d" if policy == "recompute" else "ped"))._value.get() == 1


def _serve_with_job(engine, job):
    return _recording(engine, lambda name: (job.stash, job.version_step) if name == "ad" else None)


def _fb(out):
    return FeedbackSample(
        "ad",
        "accept",
        PROMPT_A if out.num_prompt_tokens == len(PROMPT_A) else PROMPT_B,
        out.output_token_ids,
        request_id=out.request_id,
        seq=0,
    )
