"""The continual-learning job of one adapter: data, training pieces, versions, status.

Lifecycle: created in the engine thread (it reads the adapter store and may publish a fresh v1), then fed work by
the training service: `work(budget)` from the engine's iteration hook (co-serving: the leftover token budget) or from
the idle driver (no traffic: the whole budget). All training runs in the engine thread between iterations, so the
model, the adapter store and the stash are never touched concurrently. Feedback arrives from HTTP threads through
a thread-safe deque.

Data: new feedback first (FIFO), then earlier feedback again up to `epochs` passes; a deterministic `heldoutFraction`
of feedback (by id hash) is never trained on and measures held-out loss; `replayRatio` of the samples are general
replay text (replay.py). Feedback about a served request whose prompt state was stashed reuses it if it is at most
`maxActivationStaleness` optimizer steps old, else it is recomputed (prefix forward under no-grad) or dropped.

Restarts: at step boundaries the whole training state (weights, AdamW, RNGs, counters, data position, replay mixer,
publisher) is checkpointed (checkpoint.py); a job created over an adapter with checkpoints resumes from the newest
good one, so the resumed run is the uninterrupted run (docs/training-api.md, Restarts).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lorafleet.worker.training.checkpoint import (
    Checkpoint,
    CheckpointStore,
    optimizer_tensors,
    restore_optimizer,
)
from lorafleet.worker.training.coserve import CoServeScheduler, OverlapController, ShareConfig
from lorafleet.worker.training.feedback import FeedbackSample
from lorafleet.worker.training.graphed import GraphedTrainer, MicroBatch, sample_tokens
from lorafleet.worker.training.lora_context import TrainableLoRA
from lorafleet.worker.training.metrics import TrainingMetrics
from lorafleet.worker.training.pipeline import LayerwiseGroup
from lorafleet.worker.training.replay import ReplayMixer
from lorafleet.worker.training.slo import GuardConfig
from lorafleet.worker.training.stash import ActivationStash
from lorafleet.worker.training.trainer import LoRATrainer, OptimConfig, TrainSample
from lorafleet.worker.training.versions import PublishPolicy, VersionPublisher, VersionRecord, save_peft_adapter

log = logging.getLogger(__name__)


@dataclass
class JobSpec:
    name: str
    adapter: str
    mode: str = "coserve"  # coserve | standalone
    kinds: list[str] = field(default_factory=lambda: ["accept", "correction", "pair", "reward"])
    min_reward: float = 0.0
    since_seq: int = 0
    epochs: int = 3
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_steps: int | None = None
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    use_rslora: bool = False
    publish: PublishPolicy = field(default_factory=PublishPolicy)
    heldout_fraction: float = 0.1
    replay_ratio: float = 0.25
    max_staleness: int = 4
    stale_policy: str = "recompute"  # recompute | drop
    tpot_ms: float = 50.0
    tpot_percentile: float = 99.0
    min_share: float = 0.05
    record_activations: bool = True
    stash_bytes: int = 256 << 20
    max_seq_tokens: int = 1024
    seed: int = 0
    checkpoint_every: int = 10  # optimizer steps between checkpoints (also one with every published version)
    checkpoint_keep: int = 3
    graphs: str = "auto"  # auto (CUDA) | on | off: asynchronous CUDA-graph micro-batches instead of eager pieces
    graph_tokens: int = 1024  # tokens per graphed micro-batch (a longer sample takes the eager layer-wise path)
    graph_prefix: int = 4096  # stashed prefix keys per graphed micro-batch
    placement: str = "serving"  # where graphed micro-batches run (graphed.PLACEMENTS); partition is experimental
    serving_sms: int = 16  # SMs left to serving alone with the partition placement


@dataclass
class _GroupStats:
    """Loss accounting of one accumulation group (groups overlap in flight on the asynchronous path)."""

    denom: int
    started: float
    loss: float = 0.0
    tokens: int = 0
    fb_loss: float = 0.0
    fb_tokens: int = 0


@dataclass
class _GraphedRun:
    items: list
    stats: _GroupStats


@dataclass
class _Item:
    """A planned sequence of the current accumulation group."""

    sample: TrainSample
    prompt_to_recompute: bool = False
    feedback: FeedbackSample | None = None


class ContinualLearningJob:
    def __init__(
        self,
        spec: JobSpec,
        engine,
        versions_root: Path,
        replay_domains: dict[str, list[list[int]]],
        metrics: TrainingMetrics,
        state_dir: Path | None = None,
    ) -> None:
        self.spec = spec
        self.engine = engine
        self.metrics = metrics
        self.versions_root = Path(versions_root) / spec.adapter
        self.versions_root.mkdir(parents=True, exist_ok=True)
        model = engine.model
        shape = model.shape
        device = next(model.parameters()).device
        try:
            current = engine.store.current(spec.adapter)
        except KeyError:
            current = None
        if current is None:  # a restarted worker: continue from the newest version this job published
            done = sorted(
                (int(p.name[1:]), p)
                for p in self.versions_root.glob("v*")
                if p.name[1:].isdigit() and (p / "adapter_model.safetensors").exists()
            )
            if done:
                current = engine.load_adapter(spec.adapter, str(done[-1][1]), f"v{done[-1][0]}")
        # a checkpoint (weights + optimizer + data position) beats the newest version (weights only)
        self.checkpoints = CheckpointStore(Path(state_dir) / spec.adapter, spec.checkpoint_keep) if state_dir else None
        self.checkpoint_info: dict = {"everySteps": spec.checkpoint_every, "lastStep": None, "restoredStep": None}
        self.checkpoint_info["corrupt"] = []
        ckpt: Checkpoint | None = None
        lora: TrainableLoRA | None = None
        if self.checkpoints is not None:
            built: dict[str, TrainableLoRA] = {}

            def accept(c: Checkpoint) -> None:
                built["lora"] = self._lora_from_checkpoint(c, shape, device)

            res = self.checkpoints.load_latest(accept)
            ckpt, lora = res.checkpoint, built.get("lora")
            for bad in res.corrupt:
                metrics.checkpoints.labels(spec.adapter, "corrupt").inc()
                self.checkpoints.discard(Path(bad["path"]))
                log.warning("job %s: corrupt checkpoint %s: %s", spec.name, bad["path"], bad["reason"])
            self.checkpoint_info["corrupt"] = res.corrupt
        if lora is None and current is not None:
            lora = TrainableLoRA.from_peft(shape, current.path, device=device)
        elif lora is None:
            lora = TrainableLoRA(
                shape, spec.rank, spec.alpha, list(spec.targets), spec.use_rslora, device=device, seed=spec.seed
            )
        self.lora = lora
        self.trainer = LoRATrainer(model, lora, spec.optim, compute_dtype=engine.dtype)
        self.stash = ActivationStash(spec.stash_bytes, device) if spec.record_activations else None
        self.replay = ReplayMixer(replay_domains, spec.replay_ratio, seed=spec.seed)
        self.publisher = VersionPublisher(spec.publish, publish_fn=lambda step, d: 0)
        self.scheduler = CoServeScheduler(
            ShareConfig(
                tpot_target_s=spec.tpot_ms / 1000.0,
                min_share=spec.min_share,
                initial_share=0.5,
                guard=GuardConfig(quantile=spec.tpot_percentile / 100.0),
            )
        )
        self.phase = "Running"
        self.message = ""
        self.version_steps: dict[str, int] = {}
        self.current_version: str | None = None
        self._next_version = 1 + max(
            [int(p.name[1:]) for p in self.versions_root.glob("v*") if p.name[1:].isdigit()] or [0]
        )
        self._incoming: deque[FeedbackSample] = deque()
        self._fresh: deque[FeedbackSample] = deque()
        self._pool: list[FeedbackSample] = []
        self._uses: dict[str, int] = {}
        self.heldout: list[FeedbackSample] = []
        self._group: deque[_Item] = deque()
        self._gs = _GroupStats(0, 0.0)  # the group being formed / run (eager path)
        self._pipe: LayerwiseGroup | None = None
        self._pipe_items: list[_Item] = []
        self._pipe_gs = self._gs
        # asynchronous co-serving (CUDA graphs on a low-priority stream; see graphed.py)
        self.graphed: GraphedTrainer | None = None
        self.fallback = ""  # why the placement in effect is not the one asked for (status coServing.reason)
        if spec.graphs == "on" or (spec.graphs == "auto" and device.type == "cuda" and self.trainer.fused):
            # a micro-batch costs 2 x its tokens: it must fit an iteration's whole budget to ever run
            cap = max(1, min(spec.graph_tokens, int(engine.config.max_num_batched_tokens) // 2))
            self.graphed = GraphedTrainer(
                self.trainer,
                max_tokens=cap,
                max_prefix=spec.graph_prefix,
                stream=spec.placement,
                serving_sms=spec.serving_sms,
            )
            self.fallback = self.graphed.fallback
            if self.fallback:
                log.warning("job %s: %s", spec.name, self.fallback)
            self.scheduler = OverlapController(self.scheduler.cfg)
        self._mbs: deque[MicroBatch] = deque()  # launched-in-order micro-batches of the current graphed group
        self._run: _GraphedRun | None = None
        self._steps_undrained = 0
        self._barrier = False  # a launched step must be drained before the next group forms (checkpoint/publish)
        self.loss_ema: float | None = None
        self.last_loss: float | None = None
        self.heldout_loss: float | None = None
        self.tokens_trained = 0
        self.sequence_tokens = 0  # every token of finished training sequences (feedback + replay), for throughput
        self.counts = {"available": 0, "trained": 0, "rejected": 0, "replay": 0, "heldout": 0}
        self._rng = torch.Generator().manual_seed(spec.seed)
        self._seen: set[str] = set()  # feedback ids absorbed (the pool's logs may offer a sample twice)
        self._ckpt_step = 0
        self._domain_losses: dict[str, list[float]] = {}
        if current is not None:
            self.current_version = current.version
            self.version_steps[current.version] = 0
        if ckpt is not None:
            self._apply_checkpoint(ckpt)
            if spec.max_steps is not None and self.trainer.step >= spec.max_steps:
                self.phase = "Succeeded"  # it finished before the restart (its last step always checkpoints)
        elif self.checkpoint_info["corrupt"]:
            bad = ", ".join(f"step {b['step']} ({b['reason']})" for b in self.checkpoint_info["corrupt"])
            self.message = (
                f"no usable checkpoint, resumed from the newest version; skipped corrupt checkpoint(s): {bad}"
            )
        self._good = self._snapshot()
        if current is None:
            self._publish(reason_ok=True, initial=True)

    # ---- feedback intake (any thread) ----
    def offer(self, s: FeedbackSample) -> None:
        self._incoming.append(s)

    def _absorb(self) -> None:
        sp = self.spec
        while self._incoming:
            s = self._incoming.popleft()
            if s.adapter != sp.adapter or s.seq < sp.since_seq or s.feedback_id in self._seen:
                continue  # a sample can come twice: from a peer's log read at the start and by a poll (service.py)
            self._seen.add(s.feedback_id)
            if s.kind not in sp.kinds or not s.trainable or (s.kind == "reward" and s.weight <= sp.min_reward):
                self.counts["rejected"] += 1
                continue
            if len(s.prompt_ids) + len(s.completion_ids) > sp.max_seq_tokens:
                s = copy.copy(s)
                keep = max(1, sp.max_seq_tokens - len(s.completion_ids))
                s.prompt_ids = s.prompt_ids[-keep:]
                s.completion_ids = s.completion_ids[: sp.max_seq_tokens - 1]
            self.counts["available"] += 1
            h = int(hashlib.sha256(s.feedback_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            if h < sp.heldout_fraction and len(self.heldout) < 64:
                self.heldout.append(s)
                self.counts["heldout"] += 1
                if self.stash is not None and s.request_id:
                    self.stash.abort(s.request_id)
                continue
            if self._uses.get(s.feedback_id, 0) == 0:  # not taken (and trained on) before the resumed checkpoint
                self._fresh.append(s)
            self._pool.append(s)

    # ---- planning ----
    def _next_feedback(self) -> FeedbackSample | None:
        if self._fresh:
            return self._fresh.popleft()
        candidates = [s for s in self._pool if self._uses.get(s.feedback_id, 0) < self.spec.epochs]
        if not candidates:
            return None
        i = int(torch.randint(len(candidates), (1,), generator=self._rng))
        return candidates[i]

    def _form_group(self) -> bool:
        self._absorb()
        items: list[_Item] = []
        have_feedback = bool(self._fresh) or any(
            self._uses.get(s.feedback_id, 0) < self.spec.epochs for s in self._pool
        )
        if not have_feedback:
            return False
        tries = 0
        while len(items) < self.spec.optim.grad_accumulation and tries < 4 * self.spec.optim.grad_accumulation:
            tries += 1
            if self.replay.next_is_replay():
                ch = self.replay.draw()
                items.append(_Item(TrainSample(ch.token_ids[:1], ch.token_ids[1:], 1.0, domain=ch.domain)))
                continue
            fb = self._next_feedback()
            if fb is None:
                break
            self._uses[fb.feedback_id] = self._uses.get(fb.feedback_id, 0) + 1
            item = self._plan_feedback(fb)
            if item is not None:
                items.append(item)
        if not any(i.feedback is not None for i in items):
            return False
        self._group = deque(items)
        self._gs = _GroupStats(sum(i.sample.loss_tokens for i in items), time.perf_counter())
        return True

    def _plan_feedback(self, fb: FeedbackSample) -> _Item | None:
        sample = TrainSample(fb.prompt_ids, fb.completion_ids, min(1.0, fb.weight), source=fb.feedback_id)
        if self.stash is None or not fb.request_id:
            return _Item(sample, feedback=fb)
        entry = self.stash.take(fb.request_id)
        if entry is None:
            return _Item(sample, feedback=fb)  # never stashed / evicted / already used: plain full forward
        staleness = self.trainer.step - entry.version_step
        if list(entry.prompt_ids) != list(fb.prompt_ids):
            self.stash.load(entry, "cpu")  # releases it; prompt was truncated or differs: do not trust it
            return _Item(sample, feedback=fb)
        if staleness <= self.spec.max_staleness:
            kv = self.stash.load(entry, self.trainer.device, self.trainer.dtype)
            n = len(fb.prompt_ids) - 1
            sample.prefix_kv = [(k[:n], v[:n]) for k, v in kv]
            self._stash_event("reused")
            return _Item(sample, feedback=fb)
        self.stash.load(entry, "cpu")
        if self.spec.stale_policy == "drop":
            self._stash_event("dropped")
            return None
        self._stash_event("recomputed")
        return _Item(sample, prompt_to_recompute=True, feedback=fb)

    def _stash_event(self, ev: str) -> None:
        if self.stash is not None:
            setattr(self.stash.counters, ev, getattr(self.stash.counters, ev) + 1)
        self.metrics.stash_events.labels(ev).inc()

    # ---- execution (engine thread) ----
    def _prepare_group(self, budget: float) -> float | None:
        """Forms the next group and recomputes stale prefixes (no grad); the units used, None = nothing to run."""
        if not self._group and not self._form_group():
            return None
        used = 0.0
        for item in self._group:  # stale stashes with the recompute policy: prefix forward, no grad
            if item.prompt_to_recompute:
                cost = len(item.sample.prompt_ids) - 1
                if cost > budget - used:
                    return None if used == 0 else used
                item.sample.prefix_kv = self.trainer.prompt_kv(item.sample.prompt_ids)
                item.prompt_to_recompute = False
                used += cost
        return used

    def work(self, budget: float) -> float:
        """Runs training pieces worth at most `budget` token units; returns the units used."""
        if self.graphed is not None:
            return self._work_graphed(budget)
        used = 0.0
        while self.phase == "Running" and budget - used >= 1.0:
            if self._pipe is None:
                u = self._prepare_group(budget - used)
                if u is None or any(i.prompt_to_recompute for i in self._group):
                    used += u or 0.0
                    break
                used += u
                self._start_eager_group()
            u = self._pipe.work(budget - used)
            used += u
            if self._pipe.done:
                self._end_eager_group()
            elif u == 0:
                break
        return used

    def _start_eager_group(self) -> None:
        self._pipe_items = list(self._group)
        self._group.clear()
        self._pipe_gs = self._gs
        self._pipe = LayerwiseGroup(self.trainer, [i.sample for i in self._pipe_items], self._pipe_gs.denom)

    def _end_eager_group(self) -> None:
        for k, item in enumerate(self._pipe_items):
            self._sample_done(item.sample, float(self._pipe.sample_loss[k]), self._pipe.lens[k], self._pipe_gs)
        self._pipe = None
        self.trainer.optimizer_step()
        self._after_step(self._pipe_gs)

    # ---- execution, asynchronous (CUDA graphs on the training stream) ----
    @property
    def busy(self) -> bool:
        """Launched work is still running on the GPU (the idle driver polls instead of sleeping)."""
        return self.graphed is not None and bool(self.graphed.pending)

    def _work_graphed(self, budget: float) -> float:
        """Launches micro-batches (each costs 2 x its tokens of the budget) while the controller allows more in
        flight; an optimizer step launches once the previous step's results are back, so at most one step is
        ever undrained and host-side bookkeeping (loss, publish, checkpoint) always sees the weights of its step."""
        g = self.graphed
        self.drain()
        used = 0.0
        allowed = self.scheduler.allowed if isinstance(self.scheduler, OverlapController) else 1
        while self.phase == "Running":
            if self._run is None:
                if self._barrier or self._pipe is not None:
                    if self._pipe is not None and not g.pending:  # an eager (oversized) group runs synchronously
                        used += self._pipe.work(budget - used)
                        if self._pipe.done:
                            self._end_eager_group()
                    break
                u = self._prepare_group(budget - used)
                if u is None:
                    break
                used += u
                if any(i.prompt_to_recompute for i in self._group):
                    break
                try:
                    mbs = g.pack([i.sample for i in self._group], self._gs.denom)
                except ValueError:  # longer than a graph bucket: the eager layer-wise pieces, after a drain
                    self._start_eager_group()
                    continue
                self._run = _GraphedRun(list(self._group), self._gs)
                self._group.clear()
                self._mbs = deque(mbs)
            if self._mbs or g.active:
                if not g.active:
                    g.begin(self._mbs.popleft(), tag=self._run)
                cost = g.next_piece_cost()
                if g.inflight >= allowed or cost > budget - used:
                    break
                if isinstance(self.scheduler, OverlapController):
                    predicted = g.predict_seconds(cost)
                    if not self.scheduler.may_launch(predicted):
                        break
                    self.scheduler.spend(predicted)
                g.launch_piece()
                used += cost
                continue
            if self._steps_undrained:
                break
            run, self._run = self._run, None
            step = self.trainer.step + 1
            last = self.spec.max_steps is not None and step >= self.spec.max_steps
            self._barrier = last or self.publisher.due(step) or step - self._ckpt_step >= self.spec.checkpoint_every
            g.launch_step(tag=run)
            self._steps_undrained += 1
        return used

    def drain(self) -> None:
        """Books the results of finished pieces (in launch order): sample losses, then the step's bookkeeping."""
        if self.graphed is None:
            return
        for p in self.graphed.completed():
            run: _GraphedRun = p.tag
            if p.kind == "micro":
                mb = p.batch
                loss = p.host[: len(mb.owners)].double()
                sums: dict[int, float] = {}
                for owner, v in zip(mb.owners, loss.tolist(), strict=True):
                    sums[owner] = sums.get(owner, 0.0) + v
                for i in mb.samples:
                    item = run.items[i]
                    s = item.sample
                    self._sample_done(s, sums.get(i, 0.0) * s.weight, sample_tokens(s), run.stats)
            else:
                self._steps_undrained -= 1
                self._barrier = False
                self._after_step(run.stats)

    def _sample_done(self, s: TrainSample, loss_sum: float, n_tokens: int, gs: _GroupStats) -> None:
        gs.loss += loss_sum
        self.sequence_tokens += n_tokens
        gs.tokens += s.loss_tokens
        if s.domain is not None:
            self.counts["replay"] += 1
            self.replay.observe(s.domain, loss_sum / max(1, s.loss_tokens))
        else:
            self.counts["trained"] += 1
            gs.fb_loss += loss_sum / max(1e-9, s.weight)
            gs.fb_tokens += s.loss_tokens
            self.tokens_trained += s.loss_tokens
            self.metrics.tokens.labels(self.spec.adapter).inc(s.loss_tokens)

    def _after_step(self, gs: _GroupStats) -> None:
        """The bookkeeping of an optimizer step that has run (the weights are those of `self.trainer.step`)."""
        # loss = the feedback samples' token-mean loss (replay text is tracked per domain by the mixer); it drives
        # the EMA, the spike check and the metric, so a replay-heavy step cannot look like a spike
        loss = gs.fb_loss / max(1, gs.fb_tokens)
        self.last_loss = loss
        if math.isfinite(loss):
            self.loss_ema = loss if self.loss_ema is None else 0.8 * self.loss_ema + 0.2 * loss
        self.publisher.observe_loss(loss)
        dt = max(1e-9, time.perf_counter() - gs.started)
        a = self.spec.adapter
        self.metrics.steps.labels(a).inc()
        self.metrics.tokens_per_second.labels(a).set(gs.denom / dt)
        if self.loss_ema is not None:
            self.metrics.loss.labels(a).set(self.loss_ema)
        if self.stash is not None:
            self.metrics.stash_bytes.set(self.stash.bytes_used)
        step = self.trainer.step
        last = self.spec.max_steps is not None and step >= self.spec.max_steps
        if self.publisher.due(step) or (last and self.version_steps.get(self.current_version or "", -1) != step):
            self._publish(reason_ok=False)  # also on completion, so the final weights are always a version
        published_now = self.version_steps.get(self.current_version or "", -1) == step
        if published_now or last or step - self._ckpt_step >= self.spec.checkpoint_every:
            self._checkpoint()
        if last:
            self.phase = "Succeeded"

    # ---- checkpoints ----
    def _lora_from_checkpoint(self, c: Checkpoint, shape, device) -> TrainableLoRA:
        """Builds the LoRA a checkpoint describes; ValueError when its tensors do not fit (treated as corrupt)."""
        if c.state.get("step") != c.step or not isinstance(c.state.get("replay"), dict):
            raise ValueError("checkpoint state is incomplete")
        meta = c.state.get("lora") or {}
        try:
            lora = TrainableLoRA(
                shape, int(meta["rank"]), float(meta["alpha"]), list(meta["targets"]), bool(meta["useRslora"]), device
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"checkpoint has no usable LoRA description: {exc!r}") from exc
        want = dict(lora.named_parameters())
        have = {k[len("lora.") :]: v for k, v in c.tensors.items() if k.startswith("lora.")}
        if set(have) != set(want):
            raise ValueError("checkpoint LoRA parameters do not match its description")
        with torch.no_grad():
            for name, p in want.items():
                if have[name].shape != p.shape:
                    raise ValueError(f"checkpoint tensor {name} has shape {tuple(have[name].shape)}")
                p.copy_(have[name])
        names = [n for n, _ in lora.named_parameters()]
        for k, v in c.tensors.items():
            if k.startswith("opt.") and k.endswith((".exp_avg", ".exp_avg_sq")):
                name = k[len("opt.") :].rsplit(".", 1)[0]
                if name not in want or v.shape != want[name].shape:
                    raise ValueError(f"checkpoint optimizer tensor {k} does not fit the LoRA")
        if not names:
            raise ValueError("checkpoint LoRA has no parameters")
        return lora

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        names = [n for n, _ in self.lora.named_parameters()]
        out = {f"lora.{n}": p.detach().float().cpu().clone() for n, p in self.lora.named_parameters()}
        out.update({k: v.cpu() for k, v in optimizer_tensors(self.trainer.opt, names).items()})
        out["rng.job"] = self._rng.get_state()
        return out

    def _state_scalars(self) -> dict:
        rp = self.replay
        version, internal, gauss = rp._rng.getstate()
        pub = self.publisher
        return {
            "job": self.spec.name,
            "adapter": self.spec.adapter,
            "step": self.trainer.step,
            "version": self.current_version,
            "lora": {
                "rank": self.lora.rank,
                "alpha": self.lora.alpha,
                "targets": list(self.lora.targets),
                "useRslora": self.lora.use_rslora,
            },
            "tokensTrained": self.tokens_trained,
            "sequenceTokens": self.sequence_tokens,
            "counts": {"trained": self.counts["trained"], "replay": self.counts["replay"]},
            "lossEma": self.loss_ema,
            "lastLoss": self.last_loss,
            "heldoutLoss": self.heldout_loss,
            "versionSteps": dict(self.version_steps),
            "data": {"uses": dict(self._uses)},
            "replay": {
                "credit": rp._credit,
                "baseline": dict(rp._baseline),
                "ema": dict(rp._ema),
                "drawn": dict(rp.drawn),
                "rng": [version, list(internal), gauss],
            },
            "controller": {
                **self.scheduler.state(),
                "secondsPerUnit": self.graphed.seconds_per_unit if self.graphed is not None else None,
            },
            "publisher": {
                "lastStep": pub._last_step,
                "lossRef": pub._loss_ref,
                "bestHeldout": pub._best_heldout if math.isfinite(pub._best_heldout) else None,
                "published": [r.__dict__ for r in pub.published],
                "refused": list(pub.refused),
            },
        }

    def _checkpoint(self) -> None:
        """Writes the job's full training state at this step boundary (no group in flight)."""
        if self.checkpoints is None:
            return
        step = self.trainer.step
        try:
            self.checkpoints.save(step, self._state_tensors(), self._state_scalars())
        except OSError as exc:  # a full disk must not stop training; the previous checkpoint stays good
            self.metrics.checkpoints.labels(self.spec.adapter, "failed").inc()
            log.warning("job %s: checkpoint at step %d not written: %s", self.spec.name, step, exc)
            return
        self._ckpt_step = step
        self.checkpoint_info["lastStep"] = step
        self.metrics.checkpoints.labels(self.spec.adapter, "written").inc()

    def _apply_checkpoint(self, c: Checkpoint) -> None:
        st = c.state
        names = [n for n, _ in self.lora.named_parameters()]
        restore_optimizer(self.trainer.opt, names, c.tensors)
        self.trainer.step = int(st["step"])
        self._ckpt_step = self.trainer.step
        if "rng.job" in c.tensors:
            self._rng.set_state(c.tensors["rng.job"].to(torch.uint8))
        self.tokens_trained = int(st.get("tokensTrained", 0))
        self.sequence_tokens = int(st.get("sequenceTokens", 0))
        for k, v in (st.get("counts") or {}).items():
            self.counts[k] = int(v)
        self.loss_ema, self.last_loss, self.heldout_loss = st.get("lossEma"), st.get("lastLoss"), st.get("heldoutLoss")
        self.version_steps.update({str(k): int(v) for k, v in (st.get("versionSteps") or {}).items()})
        data = st.get("data") or {}
        # what was already taken is known by feedback id (`uses`), not by position: a job that moved to another
        # worker sees the pool's feedback in another order (its own log first)
        self._uses = {str(k): int(v) for k, v in (data.get("uses") or {}).items()}
        rp, r = self.replay, st.get("replay") or {}
        if r:
            rp._credit = float(r["credit"])
            rp._baseline = dict(r["baseline"])
            rp._ema = dict(r["ema"])
            rp.drawn.update(r["drawn"])
            version, internal, gauss = r["rng"]
            rp._rng.setstate((version, tuple(internal), gauss))
        pub, p = self.publisher, st.get("publisher") or {}
        if p:
            pub._last_step = int(p["lastStep"])
            pub._loss_ref = p["lossRef"]
            pub._best_heldout = math.inf if p["bestHeldout"] is None else float(p["bestHeldout"])
            pub.published = [VersionRecord(**r) for r in p["published"]]
            pub.refused = list(p["refused"])
        ctl = st.get("controller") or {}
        self.scheduler.restore(ctl)  # a different kind (eager <-> graphed after a move) starts fresh
        if self.graphed is not None and ctl.get("secondsPerUnit"):
            self.graphed.seconds_per_unit = float(ctl["secondsPerUnit"])
        self.checkpoint_info["restoredStep"] = self.trainer.step
        self.checkpoint_info["lastStep"] = self.trainer.step
        self.metrics.checkpoints.labels(self.spec.adapter, "restored").inc()
        msg = f"resumed from checkpoint step {self.trainer.step}"
        if self.checkpoint_info["corrupt"]:
            bad = ", ".join(f"step {b['step']} ({b['reason']})" for b in self.checkpoint_info["corrupt"])
            msg += f"; skipped corrupt checkpoint(s): {bad}"
        self.message = msg
        log.info("job %s: %s", self.spec.name, msg)

    # ---- versions ----
    def _snapshot(self) -> dict:
        return {
            "lora": {k: v.detach().clone() for k, v in self.lora.state_dict().items()},
            "opt": copy.deepcopy(self.trainer.opt.state_dict()),
        }

    def _rollback(self) -> None:
        if self.graphed is not None:  # queued work read the refused weights: drop it with its gradients
            self.graphed.reset()
            self._mbs.clear()
            self._run = None
            self._steps_undrained = 0
            self._barrier = False
        self.lora.load_state_dict(self._good["lora"])
        self.trainer.opt.load_state_dict(copy.deepcopy(self._good["opt"]))

    def evaluate_heldout(self) -> float | None:
        if not self.heldout:
            return None
        return self.trainer.eval_loss([TrainSample(s.prompt_ids, s.completion_ids) for s in self.heldout])

    def serving_heldout(self) -> float | None:
        """The held-out loss of the serving version's weights (the last published or resumed ones, `_good`) on the
        current held-out samples: the held-out gate's reference. The live weights are restored afterwards."""
        if not self.heldout:
            return None
        live = {k: v.detach().clone() for k, v in self.lora.state_dict().items()}
        self.lora.load_state_dict(self._good["lora"])
        try:
            return self.evaluate_heldout()
        finally:
            self.lora.load_state_dict(live)

    def _publish(self, reason_ok: bool, initial: bool = False) -> None:
        step = self.trainer.step
        heldout = None if initial else self.evaluate_heldout()
        if not reason_ok:
            gate = self.spec.publish.on_heldout_improvement and heldout is not None
            serving = self.serving_heldout() if gate else None
            why = self.publisher.check(self.last_loss, self.lora.finite(), heldout, serving)
            if why is not None:
                self.publisher.refuse(step, why, heldout, serving)
                self.metrics.refused_versions.labels(self.spec.adapter).inc()
                self.message = f"refused candidate at step {step}: {why}"
                log.warning("job %s: %s", self.spec.name, self.message)
                if "improvement" not in why:
                    self._rollback()
                return
        n = self._next_version
        self._next_version += 1
        path = save_peft_adapter(
            self.versions_root / f"v{n}",
            self.lora.export(),
            self.lora.rank,
            self.lora.alpha,
            self.lora.targets,
            str(self.engine.config.model),
            self.lora.use_rslora,
            {"job": self.spec.name, "step": step, "loss": self.last_loss, "heldoutLoss": heldout},
        )
        version = f"v{n}"
        self.engine.load_adapter(self.spec.adapter, str(path), version)  # atomic between iterations
        self.version_steps[version] = step
        self.current_version = version
        self.heldout_loss = heldout
        self.publisher.record(step, n, self.last_loss, heldout, path)
        self.metrics.published_version.labels(self.spec.adapter).set(n)
        self._good = self._snapshot()

    def version_step(self, version: str | None) -> int:
        return self.version_steps.get(version or "", 0)

    def stop(self) -> None:
        if self.phase == "Running":
            self.phase = "Stopped"
        self._pipe = None
        self._group.clear()
        if self.graphed is not None:
            self.graphed.reset()
            self._mbs.clear()
            self._run = None
            self._steps_undrained = 0
        self.trainer.opt.zero_grad(set_to_none=True)

    # ---- status ----
    def status(self) -> dict:
        st = self.stash
        return {
            "name": self.spec.name,
            "adapter": self.spec.adapter,
            "mode": self.spec.mode,
            "phase": self.phase,
            "steps": self.trainer.step,
            "tokensTrained": self.tokens_trained,
            "loss": self.loss_ema,
            "heldoutLoss": self.heldout_loss,
            "share": self.scheduler.share,
            # the outer latency loop: where it aims the iteration time, and the last observed TPOT percentile
            "latency": {
                "targetMs": self.spec.tpot_ms,
                "percentile": self.spec.tpot_percentile,
                "aim": self.scheduler.guard.aim,
                "observedRatio": self.scheduler.guard.last_quantile,
            },
            # where pieces run: `eager` without graphs (CPU; long samples), else the placement in effect (a partition
            # the driver cannot make falls back to `serving`)
            "coServing": {
                "placement": self.spec.placement,
                "effective": self.graphed.stream_mode if self.graphed is not None else "eager",
                **({"reason": self.fallback} if self.fallback else {}),
            },
            "currentVersion": int(self.current_version[1:])
            if self.current_version and self.current_version[1:].isdigit()
            else self.current_version,
            "publishedVersions": [r.to_api() for r in self.publisher.published],
            "refusedVersions": list(self.publisher.refused),
            "samples": dict(self.counts),
            "stash": {  # `is not None`: an empty stash is falsy (it has a __len__)
                "bytes": st.bytes_used if st is not None else 0,
                "entries": len(st) if st is not None else 0,
                "reused": st.counters.reused if st is not None else 0,
                "recomputed": st.counters.recomputed if st is not None else 0,
                "dropped": st.counters.dropped if st is not None else 0,
                "evicted": st.counters.evicted if st is not None else 0,
                "recorded": st.counters.recorded if st is not None else 0,
            },
            "checkpoint": dict(self.checkpoint_info),
            "message": self.message,
        }
