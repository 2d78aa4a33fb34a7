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
from lorafleet.worker.training.coserve import CoServeScheduler, ShareConfig
from lorafleet.worker.training.feedback import FeedbackSample
from lorafleet.worker.training.lora_context import TrainableLoRA
from lorafleet.worker.training.metrics import TrainingMetrics
from lorafleet.worker.training.pipeline import LayerwiseGroup
from lorafleet.worker.training.replay import ReplayMixer
from lorafleet.worker.training.stash import ActivationStash
from lorafleet.worker.training.trainer import LoRATrainer, OptimConfig, TrainSample
from lorafleet.worker.training.versions import PublishPolicy, VersionPublisher, save_peft_adapter

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
    min_share: float = 0.05
    record_activations: bool = True
    stash_bytes: int = 256 << 20
    max_seq_tokens: int = 1024
    seed: int = 0


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
        if current is not None:
            lora = TrainableLoRA.from_peft(shape, current.path, device=device)
        else:
            lora = TrainableLoRA(
                shape, spec.rank, spec.alpha, list(spec.targets), spec.use_rslora, device=device, seed=spec.seed
            )
        self.lora = lora
        self.trainer = LoRATrainer(model, lora, spec.optim, compute_dtype=engine.dtype)
        self.stash = ActivationStash(spec.stash_bytes, device) if spec.record_activations else None
        self.replay = ReplayMixer(replay_domains, spec.replay_ratio, seed=spec.seed)
        self.publisher = VersionPublisher(spec.publish, publish_fn=lambda step, d: 0)
        self.scheduler = CoServeScheduler(
            ShareConfig(tpot_target_s=spec.tpot_ms / 1000.0, min_share=spec.min_share, initial_share=0.5)
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
        self._group_denom = 0
        self._group_loss = 0.0
        self._group_tokens = 0
        self._group_fb_loss = 0.0
        self._group_fb_tokens = 0
        self._group_started = 0.0
        self._pipe: LayerwiseGroup | None = None
        self._pipe_items: list[_Item] = []
        self.loss_ema: float | None = None
        self.last_loss: float | None = None
        self.heldout_loss: float | None = None
        self.tokens_trained = 0
        self.sequence_tokens = 0  # every token of finished training sequences (feedback + replay), for throughput
        self.counts = {"available": 0, "trained": 0, "rejected": 0, "replay": 0, "heldout": 0}
        self._good = self._snapshot()
        self._rng = torch.Generator().manual_seed(spec.seed)
        self._domain_losses: dict[str, list[float]] = {}
        if current is not None:
            self.current_version = current.version
            self.version_steps[current.version] = 0
        else:
            self._publish(reason_ok=True, initial=True)

    # ---- feedback intake (any thread) ----
    def offer(self, s: FeedbackSample) -> None:
        self._incoming.append(s)

    def _absorb(self) -> None:
        sp = self.spec
        while self._incoming:
            s = self._incoming.popleft()
            if s.adapter != sp.adapter or s.seq < sp.since_seq:
                continue
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
        self._group_denom = sum(i.sample.loss_tokens for i in items)
        self._group_loss = 0.0
        self._group_tokens = 0
        self._group_fb_loss = 0.0
        self._group_fb_tokens = 0
        self._group_started = time.perf_counter()
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
    def work(self, budget: float) -> float:
        """Runs training pieces worth at most `budget` token units; returns the units used."""
        used = 0.0
        while self.phase == "Running" and budget - used >= 1.0:
            if self._pipe is None:
                if not self._group and not self._form_group():
                    break
                waiting = False
                for item in self._group:  # stale stashes with the recompute policy: prefix forward, no grad
                    if item.prompt_to_recompute:
                        cost = len(item.sample.prompt_ids) - 1
                        if cost > budget - used:
                            waiting = True
                            break
                        item.sample.prefix_kv = self.trainer.prompt_kv(item.sample.prompt_ids)
                        item.prompt_to_recompute = False
                        used += cost
                if waiting:
                    break
                self._pipe_items = list(self._group)
                self._group.clear()
                self._pipe = LayerwiseGroup(self.trainer, [i.sample for i in self._pipe_items], self._group_denom)
            u = self._pipe.work(budget - used)
            used += u
            if self._pipe.done:
                for k, item in enumerate(self._pipe_items):
                    self._sample_done(item.sample, float(self._pipe.sample_loss[k]), self._pipe.lens[k])
                self._pipe = None
                self._finish_step()
            elif u == 0:
                break
        return used

    def _sample_done(self, s: TrainSample, loss_sum: float, n_tokens: int) -> None:
        self._group_loss += loss_sum
        self.sequence_tokens += n_tokens
        self._group_tokens += s.loss_tokens
        if s.domain is not None:
            self.counts["replay"] += 1
            self.replay.observe(s.domain, loss_sum / max(1, s.loss_tokens))
        else:
            self.counts["trained"] += 1
            self._group_fb_loss += loss_sum / max(1e-9, s.weight)
            self._group_fb_tokens += s.loss_tokens
            self.tokens_trained += s.loss_tokens
            self.metrics.tokens.labels(self.spec.adapter).inc(s.loss_tokens)

    def _finish_step(self) -> None:
        self.trainer.optimizer_step()
        # loss = the feedback samples' token-mean loss (replay text is tracked per domain by the mixer); it drives
        # the EMA, the spike check and the metric, so a replay-heavy step cannot look like a spike
        loss = self._group_fb_loss / max(1, self._group_fb_tokens)
        self.last_loss = loss
        if math.isfinite(loss):
            self.loss_ema = loss if self.loss_ema is None else 0.8 * self.loss_ema + 0.2 * loss
        self.publisher.observe_loss(loss)
        dt = max(1e-9, time.perf_counter() - self._group_started)
        a = self.spec.adapter
        self.metrics.steps.labels(a).inc()
        self.metrics.tokens_per_second.labels(a).set(self._group_denom / dt)
        if self.loss_ema is not None:
            self.metrics.loss.labels(a).set(self.loss_ema)
        if self.stash is not None:
            self.metrics.stash_bytes.set(self.stash.bytes_used)
        step = self.trainer.step
        last = self.spec.max_steps is not None and step >= self.spec.max_steps
        if self.publisher.due(step) or (last and self.version_steps.get(self.current_version or "", -1) != step):
            self._publish(reason_ok=False)  # also on completion, so the final weights are always a version
        if last:
            self.phase = "Succeeded"

    # ---- versions ----
    def _snapshot(self) -> dict:
        return {
            "lora": {k: v.detach().clone() for k, v in self.lora.state_dict().items()},
            "opt": copy.deepcopy(self.trainer.opt.state_dict()),
        }

    def _rollback(self) -> None:
        self.lora.load_state_dict(self._good["lora"])
        self.trainer.opt.load_state_dict(copy.deepcopy(self._good["opt"]))

    def evaluate_heldout(self) -> float | None:
        if not self.heldout:
            return None
        return self.trainer.eval_loss([TrainSample(s.prompt_ids, s.completion_ids) for s in self.heldout])

    def _publish(self, reason_ok: bool, initial: bool = False) -> None:
        step = self.trainer.step
        heldout = None if initial else self.evaluate_heldout()
        if not reason_ok:
            why = self.publisher.check(self.last_loss, self.lora.finite(), heldout)
            if why is not None:
                self.publisher.refuse(step, why)
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
            str(getattr(self.engine.config, "model", "")),
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
            "message": self.message,
        }
