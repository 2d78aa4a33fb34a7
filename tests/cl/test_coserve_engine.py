"""Co-serving on the real engine: every iteration's inference tokens + fine-tuning units stay within the budget,
fine-tuning progresses while requests are served, and serving output is unchanged by the training in between."""

from __future__ import annotations

from lorafleet.worker.config import EngineConfig
from lorafleet.worker.engine.llm_engine import LLMEngine
from lorafleet.worker.engine.sequence import SamplingParams
from lorafleet.worker.feedback.store import FeedbackSample
from lorafleet.worker.testing import build_peft_adapter
from lorafleet.worker.training.coserve import CoServePlugin
from lorafleet.worker.training.job import ContinualLearningJob, JobSpec
from lorafleet.worker.training.metrics import TrainingMetrics
from lorafleet.worker.training.trainer import OptimConfig
from lorafleet.worker.training.versions import PublishPolicy

BUDGET = 48


def test_coserve_on_engine_respects_budget_and_trains(tmp_path, tiny_dir):
    root = tmp_path / "adapters"
    build_peft_adapter(root / "ad", tiny_dir, rank=4, alpha=8, seed=5, std=0.1)
    eng = LLMEngine(
        EngineConfig(
            model=str(tiny_dir), max_num_batched_tokens=BUDGET, kv_cache_bytes=8 << 20, adapter_roots=[str(root)]
        )
    )
    eng.load_adapter("ad", str(root / "ad"), "v1")
    prompts = [list(range(5 + i, 25 + i)) for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    reference = [o.output_token_ids for o in eng.generate(prompts, params, ["ad"] * 6)]

    spec = JobSpec(
        name="j",
        adapter="ad",
        replay_ratio=0.0,
        heldout_fraction=0.0,
        epochs=100,
        optim=OptimConfig(grad_accumulation=2),
        publish=PublishPolicy(every_steps=10**6),
        tpot_ms=10_000.0,
        record_activations=False,
        graph_tokens=16,  # a micro-batch (2 x 16 units) fits the leftover of a decode step of this budget
    )
    job = ContinualLearningJob(spec, eng, tmp_path / "v", {}, TrainingMetrics())
    for i in range(4):
        job.offer(FeedbackSample("ad", "pair", list(range(30, 50)), list(range(60, 70)), feedback_id=f"f{i}", seq=i))
    per_iter = []
    eng.add_plugin(
        CoServePlugin([job], on_iteration=lambda info, used: per_iter.append((info.num_scheduled_tokens, used)))
    )
    served = [o.output_token_ids for o in eng.generate(prompts, params, ["ad"] * 6)]
    assert served == reference  # training between iterations does not disturb serving (no publish configured)
    assert per_iter and all(inf + used <= BUDGET for inf, used in per_iter)
    assert sum(u for _, u in per_iter) > 0 and job.sequence_tokens > 0
    assert any(inf > 0 and u > 0 for inf, u in per_iter)  # really co-served, not only in idle gaps
