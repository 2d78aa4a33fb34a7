"""The continual-learning job of one adapter: feedback -> `FeedbackPlanner` (accumulation groups) -> `Executor`
(micro-batches within the budget) -> this job's bookkeeping (losses, metrics) -> `Lifecycle` (checkpoints, versions).

Why everything in the engine thread between iterations (created there, then `work(budget)` from the plugin callbacks
or the idle driver): the model, the adapter store and the stash are never touched concurrently; feedback from HTTP
threads only enters the planner's thread-safe queue (`offer`).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from lorafleet.worker.feedback.store import FeedbackSample
from lorafleet.worker.training.coserve import OverlapController, ShareConfig
from lorafleet.worker.training.executor import Executor
from lorafleet.worker.training.graphed import GraphedTrainer
from lorafleet.worker.training.lifecycle import Lifecycle, is_last
from lorafleet.worker.training.metrics import TrainingMetrics
from lorafleet.worker.training.planner import FeedbackPlanner, GroupStats
from lorafleet.worker.training.replay import ReplayMixer
from lorafleet.worker.training.slo import GuardConfig
from lorafleet.worker.training.spec import JobSpec
from lorafleet.worker.training.stash import ActivationStash
from lorafleet.worker.training.trainer import LoRATrainer, TrainSample

__all__ = ["ContinualLearningJob", "JobSpec"]

log = logging.getLogger(__name__)


class ContinualLearningJob:
    def __init__(
        self,
        spec: JobSpec,
        engine,
        versions_root: Path,
        replay_domains: dict[str, list[list[int]]],
        metrics: TrainingMetrics,
        state_dir: Path | None = None,
        sink=None,  # a sources.publish.VersionSink: versions of an adapter from a store go to that store
    ) -> None:
        self.spec = spec
        self.engine = engine
        self.metrics = metrics
        model = engine.model
        self.lifecycle = Lifecycle(spec, engine, versions_root, state_dir, metrics, sink)
        self.lora, ckpt, first = self.lifecycle.start(model.shape, next(model.parameters()).device)
        self.trainer = LoRATrainer(model, self.lora, spec.optim, compute_dtype=engine.dtype)
        self.stash = ActivationStash(spec.stash_bytes, self.trainer.device) if spec.record_activations else None
        self.replay = ReplayMixer(replay_domains, spec.replay_ratio, seed=spec.seed)
        self.counts = {"available": 0, "trained": 0, "rejected": 0, "replay": 0, "heldout": 0}
        # a micro-batch costs 2 x its tokens: it must fit an iteration's whole budget to ever run, and a sample must
        # fit a micro-batch (the planner cuts longer ones)
        cap = max(1, min(spec.graph_tokens, int(engine.config.max_num_batched_tokens) // 2))
        self.planner = FeedbackPlanner(spec, self.replay, self.stash, self.counts, self._stash_event, self.trainer, cap)
        self.graphed = GraphedTrainer(
            self.trainer,
            cap,
            spec.graph_prefix,
            spec.graphs != "off",
            stream=spec.placement,
            serving_sms=spec.serving_sms,
        )
        if self.graphed.fallback:
            log.warning("job %s: %s", spec.name, self.graphed.fallback)
        guard = GuardConfig(quantile=spec.tpot_percentile / 100.0)
        self.scheduler = OverlapController(ShareConfig(spec.tpot_ms / 1000.0, spec.min_share, guard=guard))
        self.executor = Executor(self.graphed, self.scheduler, self.planner.next_group, self)
        self.phase = "Running"
        self.message = ""
        self.loss_ema: float | None = None
        self.last_loss: float | None = None
        self.tokens_trained = 0
        self.sequence_tokens = 0  # every token of finished training sequences (feedback + replay), for throughput
        if ckpt is not None:
            self.message = self.lifecycle.restore(self, ckpt)
            if is_last(self.trainer.step, spec.max_steps):
                self.phase = "Succeeded"  # it finished before the restart (its last step always checkpoints)
        elif self.lifecycle.info["corrupt"]:
            self.message = (
                "no usable checkpoint, resumed from the newest version; skipped corrupt checkpoint(s): "
                + self.lifecycle.corrupt_note()
            )
        self.lifecycle.snapshot(self)
        if first:
            self.lifecycle.publish(self, initial=True)

    # ---- feedback intake (any thread) ----
    def offer(self, s: FeedbackSample) -> None:
        self.planner.offer(s)

    # ---- execution (engine thread) ----
    def work(self, budget: float) -> float:
        """Runs (or launches) training pieces worth at most `budget` token units, as the controller's last plan
        allows (`coserve_iteration`); returns the units used."""
        return self.executor.work(budget)

    def work_idle(self, budget: float) -> float:
        """No traffic: the whole budget, no latency credit needed (the idle driver)."""
        self.scheduler.plan(int(budget), 0, False)
        return self.executor.work(budget)

    def drain(self) -> None:
        self.executor.drain()

    @property
    def busy(self) -> bool:
        return self.executor.busy

    @property
    def asynchronous(self) -> bool:
        """Its pieces run on a GPU stream (queued after a step is launched), not inline on the host (after it)."""
        return self.graphed.cuda

    def stop(self) -> None:
        if self.phase == "Running":
            self.phase = "Stopped"
        self.executor.stop()
        self.trainer.opt.zero_grad(set_to_none=True)

    # ---- the executor's sink ----
    def running(self) -> bool:
        return self.phase == "Running"

    def barrier(self, step: int) -> bool:
        return self.lifecycle.barrier(step)

    def sample_done(self, s: TrainSample, loss_sum: float, n_tokens: int, gs: GroupStats) -> None:
        gs.loss += loss_sum
        self.sequence_tokens += n_tokens
        gs.tokens += s.loss_tokens
        if s.domain is not None:
            self.counts["replay"] += 1
            self.replay.observe(s.domain, loss_sum / max(1e-9, s.weight) / max(1, s.loss_tokens))
        else:
            self.counts["trained"] += 1
            gs.fb_loss += loss_sum / max(1e-9, s.weight)
            gs.fb_tokens += s.loss_tokens
            self.tokens_trained += s.loss_tokens
            self.metrics.tokens.labels(self.spec.adapter).inc(s.loss_tokens)

    def step_done(self, gs: GroupStats) -> None:
        """The bookkeeping of an optimizer step that has run (the weights are those of `self.trainer.step`)."""
        # loss = the feedback samples' token-mean loss (replay text is tracked per domain by the mixer): it drives
        # the EMA, the spike check and the metric, so a replay-heavy step cannot look like a spike
        loss = gs.fb_loss / max(1, gs.fb_tokens)
        self.last_loss = loss
        if math.isfinite(loss):
            self.loss_ema = loss if self.loss_ema is None else 0.8 * self.loss_ema + 0.2 * loss
        self.lifecycle.publisher.observe_loss(loss)
        a = self.spec.adapter
        self.metrics.steps.labels(a).inc()
        self.metrics.tokens_per_second.labels(a).set(gs.tokens / max(1e-9, time.perf_counter() - gs.started))
        if self.loss_ema is not None:
            self.metrics.loss.labels(a).set(self.loss_ema)
        if self.stash is not None:
            self.metrics.stash_bytes.set(self.stash.bytes_used)
        if self.lifecycle.after_step(self):
            self.phase = "Succeeded"

    def _stash_event(self, ev: str) -> None:
        if self.stash is not None:
            setattr(self.stash.counters, ev, getattr(self.stash.counters, ev) + 1)
        self.metrics.stash_events.labels(ev).inc()

    # ---- status ----
    def version_step(self, version: str | None) -> int:
        """The optimizer step whose weights `version` holds (the stash's staleness clock)."""
        return self.lifecycle.version_step(version)

    def status(self) -> dict:
        st, sched = self.stash, self.scheduler
        c = st.counters if st is not None else None
        return {
            "name": self.spec.name,
            "adapter": self.spec.adapter,
            "mode": self.spec.mode,
            "phase": self.phase,
            "steps": self.trainer.step,
            "tokensTrained": self.tokens_trained,
            "loss": self.loss_ema,
            "heldoutLoss": self.lifecycle.heldout_loss,
            "share": sched.share,
            # the outer latency loop: where it aims the iteration time, and the last observed TPOT percentile
            "latency": {
                "targetMs": self.spec.tpot_ms,
                "percentile": self.spec.tpot_percentile,
                "aim": sched.guard.aim,
                "observedRatio": sched.guard.last_quantile,
            },
            # where pieces run: the placement in effect (graphed.py; `cpu` on a CPU worker)
            "coServing": {
                "placement": self.spec.placement,
                "effective": self.graphed.stream_mode,
                **({"reason": self.graphed.fallback} if self.graphed.fallback else {}),
            },
            **self.lifecycle.status(),
            "samples": dict(self.counts),
            "stash": {  # `is not None`: an empty stash is falsy (it has a __len__)
                "bytes": st.bytes_used if st is not None else 0,
                "entries": len(st) if st is not None else 0,
                **{k: getattr(c, k) if c is not None else 0 for k in STASH_COUNTERS},
            },
            "message": self.lifecycle.note(self.message),
        }


STASH_COUNTERS = ("reused", "recomputed", "dropped", "evicted", "recorded")
