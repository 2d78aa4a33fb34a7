"""Co-serving control (FlexLLM): how much fine-tuning each serving iteration carries under the job's TPOT target.

Every iteration has a token budget (max batched tokens) and serving uses part of it; fine-tuning may take the
leftover (the hard invariant: inference tokens + fine-tuning units <= budget), and `OverlapController` decides how
much of it is spent against the latency target. `coserve_iteration` is the step the plugins run after each serving
iteration; `CoServePlugin` drives a fixed list of jobs for benchmarks and tests.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from lorafleet.worker.engine.plugin import IterationInfo, IterationPlugin
from lorafleet.worker.training.slo import GuardConfig, TpotGuard


@dataclass
class ShareConfig:
    tpot_target_s: float = 0.05
    min_share: float = 0.05
    initial_share: float = 0.5  # the starting value of the reported share
    additive_step: float = 0.05  # how fast the reported share climbs while training alone (service.py)
    decrease_factor: float = 0.5
    window: int = 64
    burst_iters: float = 8.0  # credit cap in iterations' budgets (how long a burst may be paid for in advance)
    guard: GuardConfig = field(default_factory=GuardConfig)  # the outer loop on per-request TPOT (slo.py)


def used_share(win: deque[tuple[int, int]]) -> float:
    """The reported fine-tuning share: units used / leftover tokens over recent decoding iterations (1 when none)."""
    left = sum(x[0] for x in win)
    return 1.0 if left == 0 else min(1.0, sum(x[1] for x in win) / left)


class OverlapController:
    """Budgets the device time of training per decoding iteration against the TPOT target.

    A piece queued between serving steps costs serving only what outlasts the host's gap (on a GPU the serving loop
    is host-bound: most of an iteration is Python while the GPU idles; on CPU a piece runs inline and costs its
    time). Every decoding iteration adds `gpu_budget` seconds to a credit (capped at `burst_iters` budgets, never
    below the largest piece so one longer than an iteration's budget still runs); a piece launches when the credit
    covers its predicted time (`GraphedTrainer.predict_seconds`). `gpu_budget` is AIMD on the token-to-token
    iteration time: it grows while the recent iterations stay under `(aim - 0.05) x target` and halves once they
    pass `aim x target` (aim: the TPOT guard's, slo.py), so it settles where training fills
    the gaps and stops where it starts to slow serving. `min_share` is a share of *time*: a second credit earns
    `min_share x` the iteration time every decoding iteration and launches a piece once it covers one, so
    fine-tuning never starves and slows serving by about that factor at most. Any training spends both credits;
    with nothing decoding, fine-tuning may take the whole leftover.
    """

    max_inflight = 32  # pieces queued on the training stream at most (bounds the queue serving may wait behind)

    def __init__(self, cfg: ShareConfig) -> None:
        self.cfg = cfg
        self.guard = TpotGuard(cfg.guard)
        self.gpu_budget = 0.1 * cfg.tpot_target_s
        self.credit = 0.0
        self.allowed = self.max_inflight
        self.share = max(cfg.min_share, min(1.0, cfg.initial_share))
        self.ema: float | None = None
        self.floor = 0.0  # the min share's credit (seconds of training it has paid for)
        self._idle = True  # nothing decoding (until a plan says otherwise)
        self._largest = 0.0
        self._waiting = 0.0  # the predicted seconds of the piece the job last asked to launch and was refused
        self._last_end: float | None = None
        self._win: deque[tuple[int, int]] = deque(maxlen=cfg.window)

    def retarget(self, tpot_target_s: float) -> None:
        """A new latency target: the GPU budget, credit, iteration-time average and aim start over as for a new
        job (a budget learned against a looser target would burst the new one)."""
        self.cfg.tpot_target_s = tpot_target_s
        self.gpu_budget = 0.1 * tpot_target_s
        self.credit = 0.0
        self.ema = None
        self.guard = TpotGuard(self.cfg.guard)

    def plan(self, budget: int, inference_tokens: int, decoding: bool) -> int:
        leftover = max(0, budget - inference_tokens)
        self._idle = not decoding
        if decoding:
            # never capped below the largest piece so one longer than an iteration's budget still runs
            cap = max(self.cfg.burst_iters * self.gpu_budget, self._largest)
            self.credit = min(cap, self.credit + self.gpu_budget)
            # enough for one piece, no bursts: the largest run so far, or the one waiting (a job that has run none
            # yet while inference alone misses the target would otherwise never get its first piece)
            floor_cap = max(self._largest, self._waiting)
            self.floor = min(max(floor_cap, 1e-9), self.floor + self.cfg.min_share * (self.ema or 0.0))
        return leftover

    def state(self) -> dict:
        """What a checkpoint keeps (the learned GPU budget; the credit starts empty after a restart)."""
        return {
            "kind": "overlap",
            "share": self.share,
            "gpuBudget": self.gpu_budget,
            "largest": self._largest,
            **self.guard.state(),
        }

    def restore(self, st: dict) -> None:
        if st.get("kind") != "overlap":
            return
        self.guard.restore(st)
        self.share = float(st["share"])
        self.gpu_budget = min(self.cfg.tpot_target_s, max(0.0, float(st["gpuBudget"])))
        self._largest = float(st.get("largest") or 0.0)

    def may_launch(self, predicted_s: float) -> bool:
        ok = self._idle or self.credit >= predicted_s or (self.floor >= predicted_s and self.cfg.min_share > 0)
        self._waiting = 0.0 if ok else predicted_s
        return ok

    def spend(self, predicted_s: float) -> None:
        self._largest = max(0.9 * self._largest, predicted_s)
        self._pay(predicted_s)

    def _pay(self, seconds: float) -> None:
        """Training while serving decodes spends both credits (idle training is free)."""
        if not self._idle:
            self.credit -= seconds
            self.floor = max(0.0, self.floor - seconds)

    def observe(
        self,
        budget: int,
        inference_tokens: int,
        finetune_units: int,
        inference_seconds: float,
        finetune_seconds: float,
        decoding: bool,
        iteration_seconds: float | None = None,
    ) -> None:
        c = self.cfg
        it = iteration_seconds if iteration_seconds is not None else inference_seconds + finetune_seconds
        if not decoding:
            return
        self._win.append((max(0, budget - inference_tokens), finetune_units))
        self.ema = it if self.ema is None else 0.8 * self.ema + 0.2 * it
        aim = self.guard.aim
        if self.ema > c.tpot_target_s * aim:
            self.gpu_budget *= c.decrease_factor
            self.credit = min(self.credit, self.gpu_budget)
        elif self.ema < c.tpot_target_s * (aim - 0.05):
            # a narrow band under the high-water mark: the target is often only ~10% above inference alone
            self.gpu_budget = min(c.tpot_target_s, self.gpu_budget + 0.02 * c.tpot_target_s)
        self.share = used_share(self._win)


def coserve_iteration(engine, jobs, info, metrics=None, work=None) -> float:
    """The FlexLLM step, run after a serving iteration: each job plans its units from the leftover budget, runs or
    launches that much training, and feeds the iteration's time back to its controller. Shared by the service's
    plugin and the benchmarks. Returns the units used."""
    budget = engine.config.max_num_batched_tokens
    inference = info.num_scheduled_tokens
    decoding = info.num_seqs > 0
    total = 0.0
    now = time.perf_counter()
    for job in jobs:
        sched = job.scheduler
        sched.guard.feed(engine, sched.cfg.tpot_target_s)
        plan = sched.plan(budget, inference, decoding and job.spec.mode != "standalone")
        t0 = time.perf_counter()
        used = (work(job, plan) if work is not None else job.work(plan)) if plan > 0 else 0.0
        dt = time.perf_counter() - t0
        last, sched._last_end = sched._last_end, now
        it = (now - last) if last is not None and now - last < 1.0 else info.step_seconds
        sched.observe(budget, inference, int(used), info.step_seconds, dt if used else 0.0, decoding, it)
        if metrics is not None:
            metrics.share.labels(job.spec.adapter).set(sched.share)
            if sched.guard.last_quantile is not None:
                metrics.tpot_ratio.labels(job.spec.adapter).set(sched.guard.last_quantile)
            metrics.finetune_tokens.observe(used)
        inference += int(used)
        total += used
    return total


class CoServePlugin(IterationPlugin):
    """The engine plugin (engine/plugin.py) that co-serves jobs: GPU ones after each step is queued, CPU ones after it
    is settled. The worker's training service is one (service.py); benchmarks and tests drive a fixed list of jobs
    with it directly, without the HTTP service; `on_iteration(info, units)` sees what each step trained."""

    def __init__(self, jobs: list, recorder=None, on_iteration=None, metrics=None) -> None:
        self.jobs = list(jobs)
        self.recorder = recorder  # a stash.PrefillRecorder, or None: nothing is recorded
        self.on_iteration = on_iteration
        self.metrics = metrics
        self.engine = None

    def running(self) -> list:
        return [j for j in list(self.jobs) if j.phase == "Running"]

    def work(self, job, budget: float) -> float:
        return job.work(budget)

    def attach(self, engine) -> None:
        self.engine = engine

    def on_prefill(self, batch, inputs):
        return self.recorder(batch, inputs) if self.recorder is not None else None

    def after_launch(self, info: IterationInfo) -> None:
        self._run(info, asynchronous=True)

    def after_step(self, info: IterationInfo) -> None:
        self._run(info, asynchronous=False)

    def _run(self, info, asynchronous: bool) -> None:
        jobs = [j for j in self.running() if j.asynchronous == asynchronous]
        if jobs:
            used = coserve_iteration(self.engine, jobs, info, self.metrics, self.work)
            if self.on_iteration is not None:
                self.on_iteration(info, used)
