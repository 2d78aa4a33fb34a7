"""Token-level fused co-serving (training/fused.py): training rows ride serving steps, share their GEMMs and train
exactly like `LoRATrainer`, while every step stays within the token budget and serving output does not change."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, deque

import pytest
import torch
from lorafleet.worker.config import EngineConfig
from lorafleet.worker.engine.llm_engine import LLMEngine
from lorafleet.worker.engine.sequence import SamplingParams
from lorafleet.worker.testing import build_peft_adapter
from lorafleet.worker.training.fused import FusedTrainer, _Given
from lorafleet.worker.training.lora_context import TrainableLoRA
from lorafleet.worker.training.trainer import LoRATrainer, OptimConfig, TrainSample

BUDGET = 48


def _samples(trainer: LoRATrainer) -> list[TrainSample]:
    prefix = trainer.prompt_kv(list(range(70, 85)))
    return [
        TrainSample(list(range(5, 25)), list(range(40, 52))),
        TrainSample(list(range(70, 85)), list(range(90, 99)), weight=0.5, prefix_kv=prefix),
        TrainSample(list(range(3, 9)), list(range(100, 130))),
        TrainSample([7], list(range(11, 17)), prefix_kv=[(k[:0], v[:0]) for k, v in prefix]),
    ]


def _assert_same_weights(x: TrainableLoRA, y: TrainableLoRA, tol: float = 5e-5) -> None:
    """As in test_graphed: Adam's first steps move near-zero-gradient entries by up to lr on rounding noise."""
    for (n, p), (_, q) in zip(x.named_parameters(), y.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=tol, msg=n)


def _driver(ft: FusedTrainer, plan: deque):
    """One piece per iteration, the way the co-serving hooks launch them: `plan` holds micro-batches and "step"."""

    def drive(_info=None) -> None:
        if ft.active:
            if ft.next_piece_cost() != float("inf"):
                ft.launch_piece()
        elif plan:
            item = plan.popleft()
            if item == "step":
                ft.launch_step()
            else:
                ft.begin(item)
                ft.launch_piece()

    return drive


def test_given_linear_passes_gradients_through_the_frozen_weight():
    w = torch.randn(5, 3, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    out = _Given.apply(x, w, (x @ w.t()).detach())
    g = torch.randn(4, 5, dtype=torch.float64)
    out.backward(g)
    torch.testing.assert_close(x.grad, g @ w)
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ w.t()).backward(g)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("layers", "fuse"), [(1, False), (2, True)])
def test_standalone_fused_steps_equal_trainer_steps(adapter_dir, tiny_model, layers, fuse):
    """No serving: the rows run standalone; head, then `layers` layers per backward piece, top first. `fuse`: the
    GPU serving layout (q|k|v and gate|up as one GEMM each), whose saved outputs are per group."""
    if fuse:
        tiny_model.fuse_projections()
    optim = OptimConfig(lr=5e-3, grad_accumulation=4, max_grad_norm=0.05)
    ref = LoRATrainer(tiny_model, TrainableLoRA.from_peft(tiny_model.shape, adapter_dir), optim)
    t = LoRATrainer(tiny_model, TrainableLoRA.from_peft(tiny_model.shape, adapter_dir), optim)
    g = FusedTrainer(t, max_tokens=40, max_prefix=64, layers_per_piece=layers)
    g.begin(g.pack(_samples(ref)[:1], 1)[0])
    n = tiny_model.shape.num_layers
    assert len(g._active.costs) == 2 + math.ceil(n / layers)  # ride, head, backward pieces
    g.reset()
    norms = []
    for _ in range(3):
        samples = _samples(ref)
        tokens = sum(s.loss_tokens for s in samples)
        norms.append(ref.train_step(samples).grad_norm)
        mbs = g.pack(samples, tokens)
        assert len(mbs) >= 2
        for mb in mbs:
            g.launch(mb)
        g.launch_step()
    done = g.completed()
    got = [float(p.host[0]) for p in done if p.kind == "step"]
    assert got == pytest.approx(norms, rel=1e-5) and min(norms) > 0.05
    _assert_same_weights(ref.lora, t.lora)
    assert g.rows_ridden == 0 and g.rows_standalone > 0
    # per-row losses come back like the trainer's per-sample losses
    samples = _samples(ref)
    want = ref.packed_loss_sums(samples).detach()
    g2 = FusedTrainer(LoRATrainer(tiny_model, ref.lora, optim), max_tokens=4096, max_prefix=4096)
    (mb,) = g2.pack(samples, 1)
    p = g2.launch(mb)
    sums = torch.zeros(len(samples), dtype=torch.float64)
    for owner, v in zip(mb.owners, p.host[: len(mb.owners)].tolist(), strict=True):
        sums[owner] += v * samples[owner].weight
    torch.testing.assert_close(sums, want.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(120)
def test_padded_ride_rows_change_nothing(adapter_dir, tiny_model):
    """A graphed fused step always carries `ride_rows` rows: a shorter chunk is padded with the scratch row, which
    only ever sees itself. Chunks of 7 rows padded to 16 train exactly like the trainer."""
    optim = OptimConfig(lr=5e-3, grad_accumulation=1, max_grad_norm=0.0)
    ref = LoRATrainer(tiny_model, TrainableLoRA.from_peft(tiny_model.shape, adapter_dir), optim)
    t = LoRATrainer(tiny_model, TrainableLoRA.from_peft(tiny_model.shape, adapter_dir), optim)
    ft = FusedTrainer(t, max_tokens=64, max_prefix=64, ride_rows=16)
    samples = _samples(ref)
    denom = sum(s.loss_tokens for s in samples)
    norm = ref.train_step(samples).grad_norm
    chunks = 0
    for mb in ft.pack(samples, denom):
        ft.begin(mb)
        ft._armed = True  # armed as launch_piece does while serving is busy; ridden by hand like the graphed runner
        while ft.riding:
            k = min(7, mb.tokens - ft._c0)
            idx = ft.index(k, pad_to=16)
            assert idx.tolist()[k:] == [ft.cap] * (16 - k)
            ids, pos = ft.rows(idx)
            attn, lora, cap = ft.contexts(None, None, 0, idx)
            with torch.inference_mode():
                out = tiny_model(ids, pos, attn, lora, cap)
            assert torch.isfinite(out).all()
            ft.advance(k)
            chunks += 1
        while ft.active:
            ft.launch_piece()
    ft.launch_step()
    assert chunks >= 4 and float(ft.kbuf[:, ft.cap].abs().sum()) > 0  # the scratch row was written
    got = [float(p.host[0]) for p in ft.completed() if p.kind == "step"]
    assert got == pytest.approx([norm], rel=1e-5)
    _assert_same_weights(ref.lora, t.lora)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "key_window,segments", [(2048, True), (48, True), (32, True), (48, False)], ids=["2048", "48", "32", "48-own"]
)
def test_rows_ride_serving_steps_within_budget_and_train_exactly(tmp_path, tiny_dir, key_window, segments):
    """`key_window`: 2048 is more than the key buffer (every step attends to all of it); 48: each step attends only
    to its chunk's samples' keys; 32: chunks shrink to fit, and micro-batches holding a sample longer than that run
    standalone over every key (the one that fits still rides). `segments`: the training rows' LoRA is a segment of
    the serving step's shrink/expand over a claimed store slot; False (`-own`): the rider's own GEMMs."""
    root = tmp_path / "adapters"
    build_peft_adapter(root / "ad", tiny_dir, rank=4, alpha=8, seed=5, std=0.1)
    eng = LLMEngine(
        EngineConfig(
            model=str(tiny_dir),
            device="cpu",  # the trainers' LoRA lives on the CPU; a GPU machine would otherwise put the engine there
            max_num_batched_tokens=BUDGET,
            kv_cache_bytes=8 << 20,
            adapter_roots=[str(root)],
        )
    )
    eng.load_adapter("ad", str(root / "ad"), "v1")
    prompts = [list(range(5 + i, 25 + i)) for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    adapters = ["ad", None, "ad", None, "ad", "ad"]
    reference = [o.output_token_ids for o in eng.generate(prompts, params, adapters)]

    optim = OptimConfig(lr=5e-3, grad_accumulation=2, max_grad_norm=1.0)
    model = eng.model
    ref = LoRATrainer(model, TrainableLoRA.from_peft(model.shape, root / "ad"), optim)
    t = LoRATrainer(model, TrainableLoRA.from_peft(model.shape, root / "ad"), optim)
    ft = FusedTrainer(t, max_tokens=40, max_prefix=64, layers_per_piece=1, chunk_tokens=16,
                      serving_busy=eng.has_unfinished_requests, key_window=key_window,
                      ride_lora="segments" if segments else "own")  # fmt: skip
    assert ft.kw == (None if key_window == 2048 else key_window)
    ride_lora_calls = []
    ride_lora = ft.ride_lora
    ft.ride_lora = lambda *a: ride_lora_calls.append(a[:2]) or ride_lora(*a)
    eng.runner.attach_rider(ft)
    assert (ft.slot is not None) == segments and eng.store.stats()["slots_pinned"] == int(segments)
    windows: list[int] = []
    keys_needed = ft._keys_needed

    def logged_keys(c0: int, k: int):
        out = keys_needed(c0, k)
        windows.append(out[0])
        return out

    ft._keys_needed = logged_keys
    takes: list[tuple[int, int]] = []
    take = ft.take

    def logged_take(serving: int, budget: int) -> int:
        k = take(serving, budget)
        takes.append((serving, k))
        return k

    ft.take = logged_take
    plan: deque = deque()
    norms = []
    for _ in range(2):
        samples = _samples(ref)
        denom = sum(s.loss_tokens for s in samples)
        norms.append(ref.train_step(samples).grad_norm)
        plan.extend(ft.pack(samples, denom))
        plan.append("step")

    drive = _driver(ft, plan)

    eng.iteration_hooks.append(drive)
    served = [o.output_token_ids for o in eng.generate(prompts, params, adapters)]
    assert served == reference  # the riding rows change no served token
    while plan or ft.active:  # what is left runs standalone (no serving steps any more)
        drive()
    assert ft.rows_ridden > 0, takes
    assert all(s + k <= BUDGET for s, k in takes)
    assert any(s > 0 and k > 0 for s, k in takes)  # rows really shared steps with serving tokens
    assert max(k for _, k in takes) <= 16  # chunked
    if ft.kw is not None:
        assert windows and max(w for w in windows if w <= ft.kw) <= ft.kw
    if key_window == 32:
        assert ft.rows_standalone > 0  # the micro-batches that do not fit the window
    done = ft.completed()
    got = [float(p.host[0]) for p in done if p.kind == "step"]
    assert got == pytest.approx(norms, rel=1e-5)
    _assert_same_weights(ref.lora, t.lora)
    assert bool(ride_lora_calls) != segments  # with a slot, no training row goes through the rider's own GEMMs
    users = +eng.store._proj_users
    eng.runner.attach_rider(None)
    assert ft.slot is None and eng.store.stats()["slots_pinned"] == 0
    assert users - +eng.store._proj_users == (Counter(t.lora.targets) if segments else Counter())


@pytest.mark.timeout(240)
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_job_with_fused_placement_trains_inside_serving_steps(tmp_path, tiny_dir, async_scheduling):
    """The job API's `coServing.placement: fused`: the job's rows ride the engine's steps, steps complete, serving
    output is unchanged, and stopping the job takes its rider off the runner. With async scheduling (step N is
    launched before N-1's tokens reach the host) the rows ride the same way."""
    from lorafleet.worker.training.coserve import coserve_iteration
    from lorafleet.worker.training.feedback import FeedbackSample
    from lorafleet.worker.training.job import ContinualLearningJob, JobSpec
    from lorafleet.worker.training.metrics import TrainingMetrics
    from lorafleet.worker.training.versions import PublishPolicy

    root = tmp_path / "adapters"
    build_peft_adapter(root / "ad", tiny_dir, rank=4, alpha=8, seed=5, std=0.1)
    eng = LLMEngine(
        EngineConfig(
            model=str(tiny_dir),
            max_num_batched_tokens=BUDGET,
            kv_cache_bytes=8 << 20,
            adapter_roots=[str(root), str(tmp_path / "v")],  # the job publishes its last step there
            async_scheduling=async_scheduling,
        )
    )
    eng.load_adapter("ad", str(root / "ad"), "v1")
    prompts = [list(range(5 + i, 25 + i)) for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    reference = [o.output_token_ids for o in eng.generate(prompts, params, ["ad"] * 6)]
    spec = JobSpec(
        name="j",
        adapter="ad",
        replay_ratio=0.0,
        heldout_fraction=0.0,
        epochs=100,
        optim=OptimConfig(grad_accumulation=1),
        publish=PublishPolicy(every_steps=10**6),
        tpot_ms=10_000.0,
        record_activations=False,
        train_stream="fused",
        graph_tokens=32,
        max_steps=2,
    )
    job = ContinualLearningJob(spec, eng, tmp_path / "v", {}, TrainingMetrics())
    assert eng.runner.rider is job.graphed and job.status()["coServing"]["effective"] == "fused"
    assert "reason" not in job.status()["coServing"]
    assert job.graphed.slot is not None  # its rows' LoRA rides the serving shrink/expand over a claimed slot
    assert job.status()["coServing"]["rideLora"] == "segments"
    assert job.graphed.gate == job.scheduler.may_ride  # the latency controller decides which steps carry rows
    # one rider per engine: a second fused job runs between the steps and says why
    other = ContinualLearningJob(dataclasses.replace(spec, name="k"), eng, tmp_path / "w", {}, TrainingMetrics())
    co = other.status()["coServing"]
    assert eng.runner.rider is job.graphed and co["placement"] == "fused" and co["effective"] != "fused"
    assert "another job" in co["reason"]
    other.stop()
    assert eng.runner.rider is job.graphed  # stopping the other job leaves this one's rider in place
    for i in range(4):
        job.offer(FeedbackSample("ad", "pair", list(range(30, 40)), list(range(60, 66)), feedback_id=f"f{i}", seq=i))
    eng.launch_hooks.append(lambda info: coserve_iteration(eng, [job], info))
    served = [o.output_token_ids for o in eng.generate(prompts, params, ["ad"] * 6)]
    assert served == reference
    assert job.graphed.rows_ridden > 0 and job.sequence_tokens > 0
    for _ in range(200):  # no traffic: the rest runs standalone
        if job.trainer.step >= 2:
            break
        job.work(BUDGET)
    assert job.trainer.step >= 2 and job.loss_ema is not None and math.isfinite(job.loss_ema)
    assert job.phase == "Succeeded"  # done: it rides no more, and its adapter slot is serving's again
    assert eng.runner.rider is None and job.graphed.slot is None and eng.store.stats()["slots_pinned"] == 0
    job.stop()
    assert eng.runner.rider is None


def test_rows_keep_their_own_lora_gemms_when_serving_would_lose_its_only_slot(tmp_path, tiny_dir):
    """One adapter slot: claiming it would leave serving's adapters none, so the rider keeps its own GEMMs, trains
    the same, and serving still runs through the slot."""
    root = tmp_path / "adapters"
    build_peft_adapter(root / "ad", tiny_dir, rank=4, alpha=8, seed=5, std=0.1)
    eng = LLMEngine(
        EngineConfig(model=str(tiny_dir), device="cpu", max_loras=1, kv_cache_bytes=8 << 20, adapter_roots=[str(root)])
    )
    eng.load_adapter("ad", str(root / "ad"), "v1")
    t = LoRATrainer(eng.model, TrainableLoRA.from_peft(eng.model.shape, root / "ad"), OptimConfig())
    ft = FusedTrainer(t, max_tokens=40, max_prefix=64)
    eng.runner.attach_rider(ft)
    assert ft.slot is None and eng.store.stats()["slots_pinned"] == 0
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    assert len(eng.generate([list(range(5, 25))], params, ["ad"])[0].output_token_ids) == 4
    eng.runner.attach_rider(None)
    two = LLMEngine(EngineConfig(model=str(tiny_dir), device="cpu", max_loras=2, kv_cache_bytes=8 << 20))
    two.runner.attach_rider(ft)  # the same rider on a store with room: it claims a slot there
    assert ft.slot is not None and ft.store is two.store
    with pytest.raises(ValueError, match="ride_lora"):
        FusedTrainer(t, max_tokens=40, max_prefix=64, ride_lora="shared")


def test_the_latency_gate_holds_rows_back_without_sending_them_standalone(adapter_dir, tiny_model):
    """A step the controller keeps free (gate says no) carries no rows, and such steps do not count as starved ones:
    the rows wait for a paid step instead of running standalone on the serving stream behind the controller's back."""
    t = LoRATrainer(tiny_model, TrainableLoRA.from_peft(tiny_model.shape, adapter_dir), OptimConfig())
    ft = FusedTrainer(t, max_tokens=40, max_prefix=64, serving_busy=lambda: True)
    samples = _samples(t)
    ft.begin(ft.pack(samples[:1], 1)[0])
    # arming spends none of this iteration's leftover: every step pays for its own rows in `take`, so a micro-batch
    # larger than any one step's leftover is still armed (it was charged its whole size, and never ran under load)
    assert ft.next_piece_cost() == 0.0 < ft._active.mb.tokens
    ft.launch_piece()  # arms the rows
    paid = [False] * (3 * 8) + [True]
    ft.gate = lambda: paid.pop(0)
    assert [ft.take(10, 64) for _ in range(3 * 8)] == [0] * (3 * 8)
    assert ft.last_ride == 0 and ft.next_piece_cost() == float("inf")  # still waiting for a serving step
    k = ft.take(10, 64)
    assert k == min(54, ft._active.mb.tokens) and ft.last_ride == k
    ft.gate = lambda: True
    assert ft.take(64, 64) == 0  # no budget left: that is starving (8 such steps and the rows run standalone)
    idle = FusedTrainer(t, max_tokens=40, max_prefix=64, serving_busy=lambda: False)
    idle.begin(idle.pack(samples[:1], 1)[0])
    assert idle.next_piece_cost() == idle._active.mb.tokens  # no serving steps: the rows run now, at their cost


def test_buffer_bytes_are_what_the_trainer_allocates_and_size_the_job(adapter_dir, tiny_model):
    """`buffer_bytes` is the exact size of the fused trainer's fixed buffers, so a job on a GPU sizes its
    micro-batches to the memory serving left: shrunk when the full size does not fit, none (the job runs between
    serving steps, with the reason in status) when not even one aligned chunk does."""
    from lorafleet.worker.training.fused import TOKEN_ALIGN, buffer_bytes, tokens_that_fit
    from lorafleet.worker.training.job import FUSED_MEMORY_SHARE, JobSpec, _fused_tokens

    t = LoRATrainer(tiny_model, TrainableLoRA.from_peft(tiny_model.shape, adapter_dir), OptimConfig())
    ft = FusedTrainer(t, max_tokens=200, max_prefix=100, ride_rows=8)
    # the K/V and key-metadata buffers hold the per-row and prefix views (f_seg, f_pk, ...): counted once
    tensors = [*ft.saved.values(), ft.gbuf, ft.kall, ft.vall, ft.f_ids, ft.kseg, ft.kpos, ft.korder]
    assert ft.f_pk.data_ptr() == ft.kall.data_ptr() and ft.kbuf.shape[1] == ft.f_seg.shape[0] == ft.cap + 1
    held = sum(x.numel() * x.element_size() for x in tensors)
    assert buffer_bytes(tiny_model, 200, 100, t.dtype) == held
    one = buffer_bytes(tiny_model, TOKEN_ALIGN, 100, t.dtype)
    two = buffer_bytes(tiny_model, 2 * TOKEN_ALIGN, 100, t.dtype)
    assert tokens_that_fit(tiny_model, 200, 100, t.dtype, two) == 200  # 200 rounds up to 256 = 2 chunks
    assert tokens_that_fit(tiny_model, 200, 100, t.dtype, two - 1) == TOKEN_ALIGN
    assert tokens_that_fit(tiny_model, 200, 100, t.dtype, one - 1) == 0
    spec = JobSpec(name="j", adapter="ad", graph_prefix=100)
    assert _fused_tokens(tiny_model, t.dtype, 200, spec, None) == (200, "")  # CPU: nothing sized up front
    n, why = _fused_tokens(tiny_model, t.dtype, 200, spec, int((two - 1) / FUSED_MEMORY_SHARE))
    assert n == TOKEN_ALIGN and "shrunk to 128 tokens" in why
    n, why = _fused_tokens(tiny_model, t.dtype, 200, spec, int((one - 1) / FUSED_MEMORY_SHARE))
    assert n == 0 and "running between serving steps" in why


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.timeout(600)
def test_gpu_fused_steps_replay_graphs_and_train_like_the_trainer(tmp_path, tiny_dir):
    """On a GPU, steps that carry training rows replay the rider's CUDA graphs (padded to `ride_rows`); the served
    tokens match a run without training and the gradient norms match `LoRATrainer` (fp32; Triton kernels use TF32)."""
    root = tmp_path / "adapters"
    build_peft_adapter(root / "ad", tiny_dir, rank=4, alpha=8, seed=5, std=0.1)
    eng = LLMEngine(
        EngineConfig(
            model=str(tiny_dir),
            device="cuda",
            dtype="float32",
            async_scheduling=False,  # the step-by-step comparison below; async riding is tested on CPU
            max_num_batched_tokens=256,
            max_num_seqs=16,
            num_kv_blocks=256,
            adapter_roots=[str(root)],
        )
    )
    assert eng.runner.mixed_runner is not None
    eng.load_adapter("ad", str(root / "ad"), "v1")
    prompts = [list(range(5 + i, 45 + i)) for i in range(12)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    adapters = ["ad", None] * 6
    reference = [o.output_token_ids for o in eng.generate(prompts, params, adapters)]
    optim = OptimConfig(lr=5e-3, grad_accumulation=1, max_grad_norm=0.0)
    ref = LoRATrainer(eng.model, TrainableLoRA.from_peft(eng.model.shape, root / "ad", device="cuda"), optim)
    t = LoRATrainer(eng.model, TrainableLoRA.from_peft(eng.model.shape, root / "ad", device="cuda"), optim)
    ft = FusedTrainer(t, max_tokens=128, max_prefix=512, ride_rows=32, serving_busy=eng.has_unfinished_requests)
    eng.runner.attach_rider(ft)
    assert ft.chunk_tokens == 32 and eng.runner.fused_runner_lora is not None
    samples = _samples(ref)
    denom = sum(s.loss_tokens for s in samples)
    norm = ref.train_step(samples).grad_norm
    plan = deque([*ft.pack(samples, denom), "step"])

    drive = _driver(ft, plan)

    eng.launch_hooks.append(drive)
    served = [o.output_token_ids for o in eng.generate(prompts, params, adapters)]
    while plan or ft.active:
        drive()
    ft.synchronize()
    replays = eng.runner.fused_runner.replays + eng.runner.fused_runner_lora.replays
    assert ft.rows_ridden > 0 and replays > 0
    same = sum(a == b for a, b in zip(served, reference, strict=True))
    assert same >= len(prompts) - 1, (served, reference)  # TF32 GEMMs over more rows may flip a near tie
    got = [float(p.host[0]) for p in ft.completed() if p.kind == "step"]
    assert got == pytest.approx([norm], rel=2e-2)
    eng.runner.attach_rider(None)
    assert eng.runner.fused_runner is None
