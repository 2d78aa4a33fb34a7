"""The held-out gate (`publish.onHeldoutImprovement`): a candidate whose loss on the held-out feedback is not lower
than the serving version's on the same samples is refused (never published, so never rolled out), with both losses
in the job status; a candidate that beats it is published. The first trained candidate is gated too (against the
version the job started from)."""

from __future__ import annotations

import hashlib

import pytest
import torch

PROMPT, HELD, OTHER = [5, 6, 7], [20, 21, 22], [40, 41, 42]  # a prompt, the held-out answer, a contradicting one


def _ids(fraction: float, held: bool, n: int, prefix: str) -> list[str]:
    """Feedback ids that the job's id-hash split puts into (held=True) or out of the held-out set."""
    out, i = [], 0
    while len(out) < n:
        fid = f"{prefix}-{i}"
        h = int(hashlib.sha256(fid.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        if (h < fraction) == held:
            out.append(fid)
        i += 1
    return out


def _job(tmp_path, tiny_dir, name: str, gate: bool):
    from lorafleet.worker.config import EngineConfig
    from lorafleet.worker.engine.llm_engine import LLMEngine
    from lorafleet.worker.loader import load_model
    from lorafleet.worker.testing import build_peft_adapter
    from lorafleet.worker.training.job import ContinualLearningJob, JobSpec
    from lorafleet.worker.training.lora_context import TrainableLoRA
    from lorafleet.worker.training.metrics import TrainingMetrics
    from lorafleet.worker.training.trainer import LoRATrainer, OptimConfig, TrainSample
    from lorafleet.worker.training.versions import PublishPolicy, save_peft_adapter

    root = tmp_path / name  # the adapter store; v1 is the version the job starts from
    start = build_peft_adapter(root / "ad" / "v1", tiny_dir, rank=4, alpha=8, seed=5, std=0.1)
    # the serving version already answers PROMPT with HELD (a few steps on it), so a contradicting answer can only
    # make it worse on the held-out samples, from the first step on
    model, _ = load_model(tiny_dir, torch.device("cpu"), torch.float32)
    lora = TrainableLoRA.from_peft(model.shape, start)
    trainer = LoRATrainer(model, lora, OptimConfig(lr=5e-2))
    for _ in range(4):
        trainer.train_step([TrainSample(PROMPT, HELD)])
    save_peft_adapter(start, lora.export(), lora.rank, lora.alpha, lora.targets, str(tiny_dir))
    eng = LLMEngine(EngineConfig(model=str(tiny_dir), max_num_batched_tokens=64, adapter_roots=[str(root)]))
    eng.load_adapter("ad", str(start), "v1")
    spec = JobSpec(
        name=name, adapter="ad", replay_ratio=0.0, heldout_fraction=0.5, epochs=50, record_activations=False,
        optim=OptimConfig(lr=1e-2, grad_accumulation=2), max_steps=6,
        publish=PublishPolicy(every_steps=3, on_heldout_improvement=gate, max_loss_spike=1000.0),
    )  # fmt: skip
    job = ContinualLearningJob(spec, eng, root, {}, TrainingMetrics(), None)
    return eng, job


def _run(job) -> None:
    for _ in range(500):
        if job.phase != "Running":
            break
        job.work_idle(64)
    assert job.phase == "Succeeded", job.status()


@pytest.mark.timeout(120)
def test_a_candidate_worse_than_the_serving_version_on_heldout_is_not_published(tmp_path, tiny_dir):
    from lorafleet.worker.feedback.store import FeedbackSample

    prompt, held_answer, other_answer = PROMPT, HELD, OTHER
    held = _ids(0.5, True, 3, "h")
    train = _ids(0.5, False, 4, "t")

    def offer(job, answer: list[int]) -> None:
        for i, fid in enumerate(held):  # held out: the answer the adapter should give
            job.offer(FeedbackSample("ad", "pair", prompt, held_answer, feedback_id=fid, seq=i))
        for i, fid in enumerate(train):  # trained on: `answer` for the same prompt
            job.offer(FeedbackSample("ad", "pair", prompt, answer, feedback_id=fid, seq=10 + i))

    # trained on a contradicting answer: every candidate is worse on the held-out samples than v1
    eng, job = _job(tmp_path, tiny_dir, "worse", gate=True)
    offer(job, other_answer)
    _run(job)
    st = job.status()
    assert st["samples"]["heldout"] == 3 and st["samples"]["available"] == 7
    assert st["currentVersion"] == 1 and [v["version"] for v in st["publishedVersions"]] == []
    assert [r["step"] for r in st["refusedVersions"]] == [3, 6]
    for r in st["refusedVersions"]:
        assert r["reason"].startswith("no held-out improvement")
        assert r["heldoutLoss"] > r["servingHeldoutLoss"] > 0
    assert eng.store.current("ad").version == "v1"  # what serves (and what the operator would roll out)
    assert not (tmp_path / "worse" / "ad" / "v2").exists()

    # without the gate the same training publishes (the gate is what refused it)
    _, ungated = _job(tmp_path, tiny_dir, "ungated", gate=False)
    offer(ungated, other_answer)
    _run(ungated)
    assert ungated.status()["currentVersion"] == 3 and ungated.status()["refusedVersions"] == []

    # trained on the held-out samples' answer: the candidates beat the serving version and are published
    eng, better = _job(tmp_path, tiny_dir, "better", gate=True)
    offer(better, held_answer)
    _run(better)
    st = better.status()
    assert st["refusedVersions"] == [] and [v["version"] for v in st["publishedVersions"]] == [2, 3]
    losses = [v["heldoutLoss"] for v in st["publishedVersions"]]
    assert losses[1] < losses[0]
    assert eng.store.current("ad").version == "v3"
