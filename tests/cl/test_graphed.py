"""The asynchronous graphed micro-batches (graphed.py) train exactly like `LoRATrainer`: packing with segment masks
and stashed prefixes, padded buckets, device-side clipping and the skip of a non-finite step. On CPU the same code
runs eagerly (no streams, no graphs); the GPU-only test captures real CUDA graphs."""

from __future__ import annotations

import pytest
import torch
from lorafleet.worker.training.graphed import INPUTS, GraphedTrainer
from lorafleet.worker.training.lora_context import TrainableLoRA
from lorafleet.worker.training.packing import TOKEN_ALIGN, pack
from lorafleet.worker.training.trainer import LoRATrainer, OptimConfig, TrainSample


def _samples(trainer: LoRATrainer) -> list[TrainSample]:
    prefix = trainer.prompt_kv(list(range(70, 85)))
    return [
        TrainSample(list(range(5, 25)), list(range(40, 52))),
        TrainSample(list(range(70, 85)), list(range(90, 99)), weight=0.5, prefix_kv=prefix),
        TrainSample(list(range(3, 9)), list(range(100, 130))),
        TrainSample([7], list(range(11, 17)), prefix_kv=[(k[:0], v[:0]) for k, v in prefix]),
    ]


def _pair(adapter_dir, model, optim: OptimConfig) -> tuple[LoRATrainer, LoRATrainer]:
    a = LoRATrainer(model, TrainableLoRA.from_peft(model.shape, adapter_dir), optim)
    b = LoRATrainer(model, TrainableLoRA.from_peft(model.shape, adapter_dir), optim)
    return a, b


def _assert_same_weights(x: TrainableLoRA, y: TrainableLoRA, tol: float = 5e-5) -> None:
    """Adam's first steps are ~lr x sign(g): entries with near-zero gradients move by up to lr on rounding noise
    alone, so the bound is 1% of lr (5e-3); a wrong gradient moves weights by O(lr)."""
    for (n, p), (_, q) in zip(x.named_parameters(), y.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=tol, msg=n)


@pytest.mark.timeout(120)
def test_packing_buckets_padding_and_limits():
    s = [TrainSample(list(range(1, 11)), [5, 6, 7]), TrainSample([1, 2], list(range(20, 40)))]
    mbs = pack(s, denom=23, max_tokens=64, max_prefix=0)
    assert len(mbs) == 1  # 12 + 21 tokens fit one micro-batch
    mb = mbs[0]
    assert mb.tokens == 12 + 21 and mb.bucket.tokens == TOKEN_ALIGN and mb.ids.shape[0] == TOKEN_ALIGN
    assert int((mb.seg >= 0).sum()) == 33 and set(mb.seg[33:].tolist()) == {-1}
    assert mb.bucket.rows == TOKEN_ALIGN and int((mb.row_w > 0).sum()) == 23  # loss rows = completion tokens
    assert mb.targets[:3].tolist() == [5, 6, 7] and mb.rows[:3].tolist() == [9, 10, 11]
    assert torch.allclose(mb.row_w[:23], torch.full((23,), 1 / 23)) and float(mb.row_w[23:].sum()) == 0.0
    assert mb.cost == 66.0
    assert [len(m.samples) for m in pack(s, 23, max_tokens=21, max_prefix=0)] == [1, 1]
    with pytest.raises(ValueError, match="exceeds"):
        pack(s, 23, max_tokens=20, max_prefix=0)


@pytest.mark.timeout(180)
def test_graphed_steps_equal_trainer_steps(adapter_dir, tiny_model):
    optim = OptimConfig(lr=5e-3, grad_accumulation=4, max_grad_norm=0.05)  # small clip: clipping really acts
    ref, t = _pair(adapter_dir, tiny_model, optim)
    g = GraphedTrainer(t, max_tokens=40, max_prefix=64)
    norms = []
    launched = []  # (micro-batch, copies of its inputs): a launch must never write into a batch it was given
    for _ in range(3):
        samples = _samples(ref)
        tokens = sum(s.loss_tokens for s in samples)
        norms.append(ref.train_step(samples).grad_norm)
        mbs = g.pack(samples, tokens)
        assert len(mbs) >= 2  # several micro-batches accumulate into one step
        for mb in mbs:
            launched.append((mb, {n: getattr(mb, n).clone() for n in INPUTS}))
            g.launch(mb)
        g.launch_step()
    done = g.completed()
    for mb, before in launched:
        for n in INPUTS:
            assert torch.equal(getattr(mb, n), before[n]), n
    got_norms = [float(p.host[0]) for p in done if p.kind == "step"]
    assert got_norms == pytest.approx(norms, rel=1e-5) and min(norms) > 0.05  # pre-clip norms; the clip acted
    assert [p.kind for p in done].count("step") == 3 and not g.pending
    assert t.step == ref.step == 3
    _assert_same_weights(ref.lora, t.lora)
    assert all(p.grad is None for p in t.lora.parameters())
    assert all(float(a.abs().sum()) == 0.0 for a in g.acc)
    # the per-row losses that come back equal the trainer's per-sample losses
    samples = _samples(ref)
    want = torch.stack([ref.loss_sum(s) for s in samples]).detach()
    g2 = GraphedTrainer(
        LoRATrainer(tiny_model, ref.lora, optim),
        max_tokens=4096,
        max_prefix=4096,
    )
    (mb,) = g2.pack(samples, 1)
    p = g2.launch(mb)
    got = torch.zeros(len(samples), dtype=torch.float64)
    for owner, v in zip(mb.owners, p.host[: len(mb.owners)].tolist(), strict=True):
        got[owner] += v * samples[owner].weight
    torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(120)
def test_non_finite_step_is_skipped_on_the_device(adapter_dir, tiny_model):
    _, t = _pair(adapter_dir, tiny_model, OptimConfig(lr=1e-2))
    g = GraphedTrainer(t)
    before = {n: p.detach().clone() for n, p in t.lora.named_parameters()}
    bad = TrainSample(list(range(5, 25)), list(range(40, 52)), weight=float("inf"))
    for mb in g.pack([bad], 12):
        g.launch(mb)
    step = g.launch_step()
    assert not torch.isfinite(step.host).all()  # the norm that comes back tells the job
    for n, p in t.lora.named_parameters():
        assert torch.equal(p, before[n]), n
    assert t.step == 1 and all(float(a.abs().sum()) == 0.0 for a in g.acc)
    # the next finite step trains normally
    for mb in g.pack([TrainSample(list(range(5, 25)), list(range(40, 52)))], 12):
        g.launch(mb)
    g.launch_step()
    assert any(not torch.equal(p, before[n]) for n, p in t.lora.named_parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stream", ["serving", "partition"])
def test_cuda_graph_replays_equal_eager(adapter_dir, tiny_dir, stream):
    from lorafleet.worker.loader import load_model

    model, _ = load_model(tiny_dir, torch.device("cuda"), torch.float32)
    optim = OptimConfig(lr=5e-3)
    ref = LoRATrainer(model, TrainableLoRA.from_peft(model.shape, adapter_dir, device="cuda"), optim)
    t = LoRATrainer(model, TrainableLoRA.from_peft(model.shape, adapter_dir, device="cuda"), optim)
    # partition: 8 SMs left to serving (falls back to "serving" where green contexts are unavailable)
    g = GraphedTrainer(t, max_tokens=64, max_prefix=64, stream=stream, serving_sms=8)
    for _ in range(4):
        samples = _samples(ref)
        tokens = sum(s.loss_tokens for s in samples)
        ref.train_step(samples)
        for mb in g.pack(samples, tokens):
            g.launch(mb)
        g.launch_step()
    g.synchronize()
    assert g.graph_replays > 0 and g.eager_runs == 0
    _assert_same_weights(ref.lora, t.lora, tol=1e-4)


def _job(tmp_path, tiny_dir, graphs: str, tag: str):
    from lorafleet.worker.config import EngineConfig
    from lorafleet.worker.engine.llm_engine import LLMEngine
    from lorafleet.worker.feedback.store import FeedbackSample
    from lorafleet.worker.testing import build_peft_adapter
    from lorafleet.worker.training.job import ContinualLearningJob, JobSpec
    from lorafleet.worker.training.metrics import TrainingMetrics
    from lorafleet.worker.training.versions import PublishPolicy

    root = tmp_path / f"adapters-{tag}"
    build_peft_adapter(root / "ad", tiny_dir, rank=4, alpha=8, seed=5, std=0.1)
    eng = LLMEngine(
        EngineConfig(
            model=str(tiny_dir),
            device="cpu",
            max_num_batched_tokens=96,
            kv_cache_bytes=8 << 20,
            adapter_roots=[str(tmp_path)],
        )
    )
    eng.load_adapter("ad", str(root / "ad"), "v1")
    spec = JobSpec(
        name="j",
        adapter="ad",
        replay_ratio=0.0,
        heldout_fraction=0.0,
        epochs=1,
        max_steps=3,
        optim=OptimConfig(lr=5e-3, grad_accumulation=2),
        publish=PublishPolicy(every_steps=2),
        tpot_ms=10_000.0,
        record_activations=False,
        graphs=graphs,
        graph_tokens=40,
        checkpoint_every=1,
    )
    job = ContinualLearningJob(spec, eng, tmp_path / f"v-{tag}", {}, TrainingMetrics(), state_dir=tmp_path / f"s-{tag}")
    for i in range(6):
        p = list(range(30 + i, 45 + i))
        job.offer(FeedbackSample("ad", "pair", p, list(range(60 + i, 70 + i)), feedback_id=f"f{i}", seq=i))
    return eng, job


@pytest.mark.timeout(300)
def test_job_co_served_trains_publishes_and_checkpoints_as_when_idle(tmp_path, tiny_dir):
    """Pieces placed between serving steps (the plugin, within each step's leftover budget) give the same training
    as the idle driver's whole budget: the same steps, tokens, losses, weights and published versions."""
    from lorafleet.worker.engine.sequence import SamplingParams
    from lorafleet.worker.training.coserve import CoServePlugin

    results = {}
    for how in ("idle", "coserve"):
        eng, job = _job(tmp_path, tiny_dir, "on", how)
        per_iter = []
        if how == "coserve":  # as the training service does: pieces after each step (CPU: after it is settled)
            eng.add_plugin(
                CoServePlugin(
                    [job], on_iteration=lambda info, used, p=per_iter: p.append((info.num_scheduled_tokens, used))
                )
            )
            prompts = [list(range(5 + i, 25 + i)) for i in range(4)]
            eng.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), ["ad"] * 4)
            assert per_iter and all(inf + used <= 96 for inf, used in per_iter)
            assert any(used > 0 for _, used in per_iter)  # it co-served: trained during the steps
        for _ in range(200):  # idle: the rest of the job
            if job.phase != "Running":
                break
            job.graphed.synchronize()  # on a GPU the pieces run asynchronously: let them land before polling
            job.work_idle(96)
        job.drain()
        assert job.phase == "Succeeded", job.message
        assert job.status()["coServing"] == {"placement": "serving", "effective": "cpu"}
        results[how] = job
    idle, on = results["idle"], results["coserve"]
    assert on.trainer.step == idle.trainer.step == 3
    assert on.tokens_trained == idle.tokens_trained and on.sequence_tokens == idle.sequence_tokens
    assert on.last_loss == pytest.approx(idle.last_loss, rel=1e-4)
    _assert_same_weights(idle.lora, on.lora)
    assert [r.step for r in on.lifecycle.publisher.published] == [r.step for r in idle.lifecycle.publisher.published]
    assert on.lifecycle.info["lastStep"] == 3 and on.lifecycle.current_version == idle.lifecycle.current_version


@pytest.mark.timeout(120)
def test_share_controller_state_survives_a_restart(tmp_path, tiny_dir):
    """A checkpoint keeps what the co-serving controller learned (GPU budget, piece price), so a restarted worker
    does not start co-serving from a cold guess."""
    from lorafleet.worker.training.job import ContinualLearningJob
    from lorafleet.worker.training.metrics import TrainingMetrics

    eng, job = _job(tmp_path, tiny_dir, "on", "ck")
    job.scheduler.gpu_budget, job.scheduler.share, job.scheduler._largest = 0.0123, 0.42, 0.02
    job.graphed.seconds_per_unit = 3.5e-6
    job.lifecycle.checkpoint(job)
    again = ContinualLearningJob(job.spec, eng, tmp_path / "v-ck", {}, TrainingMetrics(), state_dir=tmp_path / "s-ck")
    assert again.lifecycle.info["restoredStep"] == 0
    assert (again.scheduler.gpu_budget, again.scheduler.share, again.scheduler._largest) == (0.0123, 0.42, 0.02)
    assert again.graphed.seconds_per_unit == 3.5e-6


@pytest.mark.timeout(60)
def test_prefix_buffers_are_shared_between_buckets_of_one_prefix_size(adapter_dir, tiny_model):
    """Buckets multiply (tokens x rows x prefix); the prefix K/V buffers, the large ones, exist once per size."""
    _, t = _pair(adapter_dir, tiny_model, OptimConfig())
    g = GraphedTrainer(t, max_tokens=4096, max_prefix=4096)
    pre = t.prompt_kv(list(range(70, 85)))
    short = TrainSample(list(range(70, 85)), [5, 6], prefix_kv=pre)
    long = TrainSample(list(range(70, 85)), [10 + i % 100 for i in range(200)], prefix_kv=pre)
    for s in (short, long):
        g.launch(g.pack([s], s.loss_tokens)[0])
    a, b = list(g._static.values())
    assert a.pk is b.pk and a.pv is b.pv and len(g._prefix_bufs) == 1 and a.ids is not b.ids
