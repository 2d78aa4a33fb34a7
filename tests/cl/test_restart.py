"""Restart fidelity: a job killed (SIGKILL) mid-training and restarted ends with the same LoRA weights, counters and
versions as an uninterrupted run on the same feedback, also when its newest checkpoint is corrupt (it falls back to
the previous one, says so in the job status and counts it in a metric)."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

MAX_STEPS = 30
# fp32 round-off only: a restarted process's buffers sit at other addresses, and a BLAS may block a reduction by
# alignment, so a gradient can differ in its last bits and AdamW (which divides by sqrt(v)) carries that into the
# weights (CI once saw 1.06e-6 after 30 steps). A restore that loses anything (a step, the optimizer state, the data
# position) moves the weights by about lr = 1e-2 per step.
TOL = 2e-5
JOB = {
    "name": "rs",
    "adapter": "rs",
    "optimizer": {"lr": 0.01, "gradAccumulation": 4, "maxSteps": MAX_STEPS},
    "publish": {"everySteps": 7, "maxLossSpike": 1000.0},  # heldoutFraction stays 0.1: the split is by feedback id
    "checkpoint": {"everySteps": 3, "keep": 3},
    "replayRatio": 0.25,
    "feedback": {"epochs": 20},
}


def _final(c: httpx.Client, wait_until) -> dict:
    st = wait_until(lambda: (s := c.get("/v1/training/jobs/rs").json())["phase"] != "Running" and s, timeout=150)
    assert st["phase"] == "Succeeded", st
    return st


def _weights(st: dict) -> dict[str, torch.Tensor]:
    return load_file(str(Path(st["publishedVersions"][-1]["path"]) / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkill_restart_equals_uninterrupted_run(tmp_path, tiny_dir, worker_process, wait_until):
    root, train = tmp_path / "b-adapters", tmp_path / "b-train"
    root.mkdir()
    # run B, part 1: feedback first (so the job sees it in log order), then the job; SIGKILL while it trains
    proc, url = worker_process(tiny_dir, root, train)
    c = httpx.Client(base_url=url, timeout=60)
    for i in range(12):
        body = {"kind": "pair", "adapter": "rs", "prompt": f"question {i}: colour?", "completion": f" blue {i % 3}"}
        assert c.post("/v1/feedback", json=body).status_code == 202
    assert c.post("/v1/training/jobs", json=JOB).status_code == 201
    st = wait_until(lambda: (s := c.get("/v1/training/jobs/rs").json())["steps"] >= 8 and s, interval=0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    killed_at = st["steps"]
    assert 8 <= killed_at < MAX_STEPS, st
    ckdir = train / "checkpoints" / "rs"
    steps = sorted(int(p.name[5:]) for p in ckdir.glob("step-*"))
    assert len(steps) >= 2 and steps[-1] < MAX_STEPS, steps

    # the reference: an uninterrupted run over the very same feedback log (same ids, so the same held-out split)
    ref_root, ref_train = tmp_path / "a-adapters", tmp_path / "a-train"
    ref_root.mkdir()
    ref_train.mkdir()
    shutil.copy(train / "feedback.log", ref_train / "feedback.log")
    rproc, rurl = worker_process(tiny_dir, ref_root, ref_train)
    rc = httpx.Client(base_url=rurl, timeout=60)
    assert rc.post("/v1/training/jobs", json=JOB).status_code == 201
    ref = _final(rc, wait_until)
    rproc.kill()
    rproc.wait(30)

    # damage B's checkpoints: the newest one's tensors flipped in place (same size), plus a torn temp write
    newest = ckdir / f"step-{steps[-1]:08d}"
    data = bytearray((newest / "tensors.safetensors").read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    (newest / "tensors.safetensors").write_bytes(bytes(data))
    torn = ckdir / ".tmp-99999999-1-1"
    torn.mkdir()
    (torn / "tensors.safetensors").write_bytes(data[: len(data) // 2])

    # run B, part 2: the persisted job resumes by itself from the previous good checkpoint
    proc, url = worker_process(tiny_dir, root, train)
    c = httpx.Client(base_url=url, timeout=60)
    st = wait_until(lambda: (r := c.get("/v1/training/jobs/rs")).status_code == 200 and r.json())
    ck = st["checkpoint"]
    assert ck["restoredStep"] == steps[-2], ck
    assert [b["step"] for b in ck["corrupt"]] == [steps[-1]] and "SHA-256" in ck["corrupt"][0]["reason"], ck
    assert "corrupt" in st["message"]
    assert not torn.exists()  # the torn write is removed
    # the corrupt one is moved aside; the resumed job may already have written a fresh checkpoint of that step
    assert not newest.exists() or (newest / "tensors.safetensors").read_bytes() != bytes(data)
    metrics = c.get("/metrics").text
    assert 'lorafleet_training_checkpoints_total{adapter="rs",result="corrupt"} 1.0' in metrics
    assert 'lorafleet_training_checkpoints_total{adapter="rs",result="restored"} 1.0' in metrics
    # ... and is killed again a few steps later (clean checkpoints this time)
    st = wait_until(lambda: (s := c.get("/v1/training/jobs/rs").json())["steps"] >= steps[-2] + 6 and s, interval=0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert st["steps"] < MAX_STEPS, st
    steps2 = sorted(int(p.name[5:]) for p in ckdir.glob("step-*"))

    # run B, part 3: resumes from the newest checkpoint and finishes
    proc, url = worker_process(tiny_dir, root, train)
    c = httpx.Client(base_url=url, timeout=60)
    wait_until(lambda: c.get("/v1/training/jobs/rs").status_code == 200)
    got = _final(c, wait_until)
    assert got["checkpoint"]["restoredStep"] == steps2[-1] and got["checkpoint"]["corrupt"] == [], got["checkpoint"]
    assert got["message"].startswith(f"resumed from checkpoint step {steps2[-1]}")

    # the twice-restarted training is the uninterrupted training: weights, counters, versions
    w_ref, w_got = _weights(ref), _weights(got)
    assert w_ref.keys() == w_got.keys() and len(w_ref) > 0
    diff = max(float((w_ref[k] - w_got[k]).abs().max()) for k in w_ref)
    assert diff <= TOL, diff
    assert any(float(v.abs().max()) > 0 for k, v in w_ref.items() if "lora_B" in k)  # it did train
    assert got["steps"] == ref["steps"] == MAX_STEPS
    assert got["tokensTrained"] == ref["tokensTrained"]
    assert got["samples"] == ref["samples"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    # versions are published at the same steps with the same weights; numbers never go back, so a version published
    # before a crash keeps its number even when its step is redone (the redone one gets the next number)
    assert [v["step"] for v in got["publishedVersions"]] == [v["step"] for v in ref["publishedVersions"]]
    nums = [v["version"] for v in got["publishedVersions"]]
    assert nums == sorted(set(nums)), nums
    for a, b in zip(ref["publishedVersions"][1:], got["publishedVersions"][1:], strict=True):
        wa = load_file(str(Path(a["path"]) / "adapter_model.safetensors"))
        wb = load_file(str(Path(b["path"]) / "adapter_model.safetensors"))
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= TOL, (a, b)
    proc.kill()
    proc.wait(30)

    # a finished job restarted once more stays finished: no step beyond maxSteps, no new version
    proc, url = worker_process(tiny_dir, root, train)
    c = httpx.Client(base_url=url, timeout=60)
    st = wait_until(lambda: (r := c.get("/v1/training/jobs/rs")).status_code == 200 and r.json())
    assert st["phase"] == "Succeeded" and st["steps"] == MAX_STEPS and st["checkpoint"]["restoredStep"] == MAX_STEPS
    assert st["publishedVersions"] == got["publishedVersions"]


@pytest.mark.timeout(120)
def test_a_moved_job_knows_what_it_trained_by_feedback_id_not_by_log_position(tmp_path, tiny_dir):
    """After a move the job sees the pool's feedback in another order (the new worker's own log first). What it
    had already taken before its checkpoint is skipped by feedback id; everything else is fresh, wherever it is."""
    from lorafleet.worker.config import EngineConfig
    from lorafleet.worker.engine.llm_engine import LLMEngine
    from lorafleet.worker.feedback.store import FeedbackSample
    from lorafleet.worker.testing import build_peft_adapter
    from lorafleet.worker.training.job import ContinualLearningJob, JobSpec
    from lorafleet.worker.training.metrics import TrainingMetrics
    from lorafleet.worker.training.trainer import OptimConfig
    from lorafleet.worker.training.versions import PublishPolicy

    root = tmp_path / "adapters"
    build_peft_adapter(root / "ad", tiny_dir, rank=4, alpha=8, seed=5, std=0.1)
    eng = LLMEngine(EngineConfig(model=str(tiny_dir), max_num_batched_tokens=64, adapter_roots=[str(root)]))
    eng.load_adapter("ad", str(root / "ad"), "v1")
    spec = JobSpec(
        name="m", adapter="ad", replay_ratio=0.0, heldout_fraction=0.0, epochs=1, checkpoint_every=1,
        optim=OptimConfig(grad_accumulation=2), publish=PublishPolicy(every_steps=10**6), record_activations=False,
    )  # fmt: skip
    ckpt = tmp_path / "ckpt"

    def fb(i: int) -> FeedbackSample:
        return FeedbackSample("ad", "pair", [5 + i, 6 + i], [20 + i, 21 + i], feedback_id=f"fb-{i}", seq=i)

    a = ContinualLearningJob(spec, eng, tmp_path / "v", {}, TrainingMetrics(), ckpt)
    for i in range(2):  # trained by the first trainer (one step)
        a.offer(fb(i))
    for _ in range(200):
        if a.trainer.step >= 1:
            break
        a.work_idle(64)
    a.drain()  # the step's results are booked (and it is checkpointed) once they are back
    a.stop()
    assert a.lifecycle.info["lastStep"] == 1
    # fb-2, fb-3: accepted after that step (by the first trainer or a peer), never trained

    b = ContinualLearningJob(spec, eng, tmp_path / "v", {}, TrainingMetrics(), ckpt)  # the job, moved
    assert b.lifecycle.info["restoredStep"] == a.lifecycle.info["lastStep"]
    b.offer(FeedbackSample("ad", "pair", [9], [10, 11], feedback_id="fb-new", seq=0))  # its own log first
    for i in (3, 2, 1, 0):
        b.offer(fb(i))
    b.offer(fb(1))  # read twice (a peer log at start, then a poll)
    b.planner._absorb()
    fresh = [s.feedback_id for s in b.planner._fresh]
    assert sorted(fresh) == ["fb-2", "fb-3", "fb-new"]  # by position it would have skipped fb-new and fb-3
    assert b.counts["available"] == 5
    b.stop()
