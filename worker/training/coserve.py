"""FlexLLM-style co-serving: fine-tuning takes the leftover token budget of each serving iteration.

Why: a serving iteration has a token budget (max batched tokens); decode-heavy traffic leaves most of it unused.
Fine-tuning fills that leftover. How much of it, per iteration, is decided against the job's TPOT target:
- TPOT is a per-request *average* over its decode iterations, so the controller budgets *time*, not single
  iterations: every decoding iteration adds `target * high_water - inference_seconds` to a time credit (negative
  when inference alone is already slow), every training piece spends its measured seconds. A piece runs when the
  credit covers its predicted cost, from an online linear fit `seconds = a + b * units` of past pieces (the
  intercept matters: eager training pieces have a fixed launch cost, so a few larger pieces beat many tiny ones).
  The credit is capped, so bursts stay short (a request's TPOT averages over ~`burst_iters` iterations). Pieces
  are indivisible and the scheduler cannot see their sizes: a packed head piece of a 1B model is ~1000 units,
  which at the fit's price (mixed piece types; ~7000 units/s from the H200 fine-tuning-alone rate) exceeds an
  8 x 16 ms cap, so a plan limited by the capped credit ran nothing, for good, while decodes were in flight
  (`min_share` or not). So when a plan at the cap runs nothing, the next one offers the whole leftover; debt is
  not forgiven, so such a piece is paid back in full over the following iterations.
- fixed costs are amortised: spending the credit as soon as it covers *any* piece makes every iteration pay the
  intercept `a` for a sliver of work (with a headroom h per iteration, only (h - a)/h of the credit trains, and on
  a fast GPU h is a few ms, the same order as an eager piece's fixed cost).
  A piece therefore waits until the credit buys at least `amortise x a` seconds of marginal work (or the whole
  leftover, or the credit is at its cap and cannot grow): the same time is spent, in fewer, larger pieces.
- `min_share` is a share of time: every decoding iteration earns at least `min_share x inference seconds` of
  credit even when inference alone misses the target, so fine-tuning never starves and slows decodes by about
  that factor at most. The reported share is the fraction of the leftover tokens fine-tuning used recently.
- with no decodes in flight (idle or prefill only) fine-tuning may take the whole leftover.
- the aim (`high_water` at first) is moved by an outer loop on the TPOT percentile that finished requests got
  (`TpotGuard`, slo.py): iteration times are what this loop can see every step, per-request TPOT is what the
  target is about, and the two drift apart with lumpy training or spiky serving iterations.
The hard invariant is `inference_tokens + finetune_units <= budget` for every iteration.
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
    initial_share: float = 0.5  # kept for API compatibility: the starting value of the reported share
    additive_step: float = 0.05
    decrease_factor: float = 0.5
    high_water: float = 0.95  # aim the average iteration time at this fraction of the target
    low_water: float = 0.80
    window: int = 64
    burst_iters: float = 8.0  # credit cap in units of the target (how long a burst may be paid for in advance)
    amortise: float = 3.0  # a piece's marginal seconds >= amortise x the fixed cost (0 = spend credit greedily)
    guard: GuardConfig = field(default_factory=GuardConfig)  # the outer loop on per-request TPOT (slo.py)


class LinearCostModel:
    """Least-squares fit of seconds against units over a sliding window (intercept clamped at >= 0)."""

    def __init__(self, window: int = 64) -> None:
        self._pts: deque[tuple[float, float]] = deque(maxlen=window)

    def add(self, units: float, seconds: float) -> None:
        self._pts.append((float(units), float(seconds)))

    def fit(self) -> tuple[float, float] | None:
        n = len(self._pts)
        if n < 4:
            return None
        mx = sum(p[0] for p in self._pts) / n
        my = sum(p[1] for p in self._pts) / n
        sxx = sum((p[0] - mx) ** 2 for p in self._pts)
        if sxx <= 1e-9:
            return max(0.0, my) * 0.5, max(my, 1e-9) / max(mx, 1.0) * 0.5
        c1 = max(sum((p[0] - mx) * (p[1] - my) for p in self._pts) / sxx, 1e-12)
        return max(0.0, my - c1 * mx), c1


def used_share(win: deque[tuple[int, int]]) -> float:
    """The reported fine-tuning share: units used / leftover tokens over recent decoding iterations (1 when none)."""
    left = sum(x[0] for x in win)
    return 1.0 if left == 0 else min(1.0, sum(x[1] for x in win) / left)


class CoServeScheduler:
    """Plans the fine-tuning units of each iteration from a time credit against the TPOT target."""

    def __init__(self, cfg: ShareConfig) -> None:
        self.cfg = cfg
        self.share = max(cfg.min_share, min(1.0, cfg.initial_share))
        self.cost = LinearCostModel(cfg.window)
        self.credit = 0.0
        self.guard = TpotGuard(cfg.guard)  # moves the aim by the TPOT requests got
        self._win: deque[tuple[int, int]] = deque(maxlen=cfg.window)  # (leftover, used)
        self.history: deque[tuple[int, int, int, float]] = deque(maxlen=4096)
        self._last_plan = 0
        self._stalled = False  # a plan > 0 ran nothing: the next piece is larger than the plan

    def state(self) -> dict:
        """What a checkpoint keeps, so a restarted job starts from the share it had learned, not from scratch."""
        return {
            "kind": "credit",
            "share": self.share,
            "credit": self.credit,
            "cost": list(self.cost._pts),
            **self.guard.state(),
        }

    def restore(self, st: dict) -> None:
        if st.get("kind") != "credit":
            return
        self.guard.restore(st)
        self.share = float(st["share"])
        self.credit = min(float(st["credit"]), self.cfg.burst_iters * self.cfg.tpot_target_s)
        for units, seconds in st.get("cost") or []:
            self.cost.add(units, seconds)

    def retarget(self, tpot_target_s: float) -> None:
        """A new latency target: what was learned relative to the old one (credit, aim) starts over; the piece cost
        model is physics and stays."""
        self.cfg.tpot_target_s = tpot_target_s
        self.credit = 0.0
        self.guard = TpotGuard(self.cfg.guard)

    def plan(self, budget: int, inference_tokens: int, decoding: bool) -> int:
        """Fine-tuning units for this iteration: never more than the leftover."""
        leftover = max(0, budget - inference_tokens)
        if leftover == 0:
            return 0
        if not decoding:
            return leftover
        fit = self.cost.fit()
        if fit is None:  # no cost estimate yet: calibrate with the leftover whenever there is credit
            return leftover if self.credit > 0 else 0
        capped = self.credit >= 0.99 * self.cfg.burst_iters * self.cfg.tpot_target_s
        if capped and self._stalled:
            # the credit cannot grow and the capped plan ran nothing (the next piece costs more than the cap;
            # the scheduler cannot see piece sizes): offer the whole leftover instead of stalling forever
            self._last_plan = leftover
            return leftover
        a, b = fit
        affordable = (self.credit - a) / b
        units = int(min(leftover, affordable)) if affordable >= 1 else 0
        # amortise the fixed cost: save the credit up for a larger piece (until the credit reaches its cap)
        worth = max(1.0, self.cfg.amortise * a / b)
        if units < min(worth, leftover) and not capped:
            units = 0
        self._last_plan = units
        return units

    def observe(
        self,
        budget: int,
        inference_tokens: int,
        finetune_units: int,
        inference_seconds: float,
        finetune_seconds: float,
        decoding: bool,
    ) -> None:
        """Feeds one finished iteration (its inference part and the training piece that followed)."""
        c = self.cfg
        if finetune_units > 0:
            self.cost.add(finetune_units, finetune_seconds)
        if self._last_plan > 0:
            self._stalled = finetune_units == 0
        self._last_plan = 0
        leftover = max(0, budget - inference_tokens)
        self.history.append((budget, inference_tokens, finetune_units, inference_seconds + finetune_seconds))
        if decoding:
            # the min share is a share of *time*: even when inference alone misses the target, fine-tuning accrues
            # min_share x the inference time, so it never starves and slows decodes by about that factor at most
            headroom = max(c.tpot_target_s * self.guard.aim - inference_seconds, c.min_share * inference_seconds)
            self.credit += headroom - finetune_seconds
            # capped above only: debt is repaid in full (forgiving it would let pieces larger than the cap take
            # more than the share of time the target leaves; pieces only start from a positive credit)
            self.credit = min(c.burst_iters * c.tpot_target_s, self.credit)
            self._win.append((leftover, finetune_units))
        else:
            self.credit = max(0.0, self.credit)
        self.share = used_share(self._win)


class OverlapController:
    """Share control for pieces that run *asynchronously* (CUDA graphs on a low-priority stream, graphed.py).

    Why a different controller: an asynchronous piece costs the serving loop almost no host time; what it can cost
    is contention - serving kernels that wait for SMs or bandwidth while training kernels run - and it costs nothing
    when it runs in the gap between two serving steps (the serving loop is host-bound: most of an iteration is
    Python while the GPU idles). So the controller budgets *GPU time of training per decoding iteration*: every
    decoding iteration adds `gpu_budget` seconds to a credit (capped at a few iterations' worth, and never below
    the largest piece so a piece longer than one iteration's budget still runs); a piece launches when the credit
    covers its predicted GPU time (measured with CUDA events, `GraphedTrainer.predict_seconds`). `gpu_budget` is
    AIMD on the token-to-token iteration time against the TPOT target: it grows while the recent iterations stay
    under `(aim - 0.05) x target` and halves once they pass `aim x target` (aim: `high_water`, moved by the TPOT
    guard), so it settles where training fills the gaps and stops where it starts to slow serving. `min_share` is a
    share of *time*, as in `CoServeScheduler`: a second credit earns `min_share x` the iteration time every decoding
    iteration and launches a piece once it covers one, whatever the first credit says, so fine-tuning
    never starves and slows serving by about that factor at most (counting pieces instead would let a 15 ms graphed
    micro-batch every 20 iterations of 7 ms take 11% at a 5% floor). Any training spends both credits.
    With nothing decoding: the whole leftover, no credit needed.
    The budget invariant is the same as everywhere: inference tokens + fine-tuning units <= budget.
    """

    max_inflight = 32  # pieces queued on the training stream at most (bounds the queue serving may wait behind)

    def __init__(self, cfg: ShareConfig) -> None:
        self.cfg = cfg
        self.guard = TpotGuard(cfg.guard)
        self.gpu_budget = 0.1 * cfg.tpot_target_s
        self.credit = 0.0
        self.allowed = self.max_inflight
        self.share = max(cfg.min_share, min(1.0, cfg.initial_share))
        self.cost = LinearCostModel(cfg.window)  # launch (host) seconds per unit, for the benchmark's report
        self.ema: float | None = None
        self.floor = 0.0  # the min share's credit (seconds of training it has paid for)
        self._idle = False
        self._largest = 0.0
        self._waiting = 0.0  # the predicted seconds of the piece the job last asked to launch and was refused
        self._last_end: float | None = None
        self._win: deque[tuple[int, int]] = deque(maxlen=cfg.window)
        self.history: deque[tuple[int, int, int, float]] = deque(maxlen=4096)

    def retarget(self, tpot_target_s: float) -> None:
        """A new latency target: the GPU budget, credit, iteration-time average and aim start over as for a new
        job (a budget learned against a looser target would burst the new one)."""
        self.cfg.tpot_target_s = tpot_target_s
        self.gpu_budget = 0.1 * tpot_target_s
        self.credit = 0.0
        self.ema = None
        self.guard = TpotGuard(self.cfg.guard)

    @property
    def depth(self) -> float:
        """The per-iteration training GPU budget in units of the TPOT target (reported by the benchmark)."""
        return self.gpu_budget / max(self.cfg.tpot_target_s, 1e-9)

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
        if finetune_units > 0:
            self.cost.add(finetune_units, finetune_seconds)
        it = iteration_seconds if iteration_seconds is not None else inference_seconds + finetune_seconds
        self.history.append((budget, inference_tokens, finetune_units, it))
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
    """FlexLLM step, run at the end of a serving iteration: each job plans its tokens from the leftover budget,
    runs (eager pieces) or launches (asynchronous graphs) that much training, and feeds the iteration's time back
    to its controller. Shared by the service's engine plugin and the GPU benchmarks. Returns the units used."""
    budget = engine.config.max_num_batched_tokens
    inference = info.num_scheduled_tokens
    decoding = info.num_seqs > 0
    total = 0.0
    now = time.perf_counter()
    for job in jobs:
        job.scheduler.guard.feed(engine, job.scheduler.cfg.tpot_target_s)
        if job.spec.mode == "standalone":
            plan = max(0, budget - inference)
            job.scheduler.plan(budget, inference, False)
        else:
            plan = job.scheduler.plan(budget, inference, decoding)
        t0 = time.perf_counter()
        used = (work(job, plan) if work is not None else job.work(plan)) if plan > 0 else 0.0
        overlapped = isinstance(job.scheduler, OverlapController)
        if used and engine.device.type == "cuda" and not overlapped:
            import torch

            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if overlapped:
            sched = job.scheduler
            last, sched._last_end = sched._last_end, now
            it = (now - last) if last is not None and now - last < 1.0 else info.step_seconds
            sched.observe(budget, inference, int(used), info.step_seconds, dt if used else 0.0, decoding, it)
        else:
            job.scheduler.observe(budget, inference, int(used), info.step_seconds, dt if used else 0.0, decoding)
        if metrics is not None:
            metrics.share.labels(job.spec.adapter).set(job.scheduler.share)
            if job.scheduler.guard.last_quantile is not None:
                metrics.tpot_ratio.labels(job.spec.adapter).set(job.scheduler.guard.last_quantile)
            metrics.finetune_tokens.observe(used)
        inference += int(used)
        total += used
    return total


class CoServePlugin(IterationPlugin):
    """An engine plugin (engine/plugin.py) that co-serves a fixed list of jobs: graphed ones after each step is
    queued, eager ones after it is settled, as the worker's training service does. For benchmarks and tests,
    which drive jobs without the HTTP service; `on_iteration(info, units)` sees what each step trained."""

    def __init__(self, jobs: list, recorder=None, on_iteration=None) -> None:
        self.jobs = list(jobs)
        self.recorder = recorder  # a PrefillRecorder (recorder.py), or None: nothing is recorded
        self.on_iteration = on_iteration
        self.engine = None

    def attach(self, engine) -> None:
        self.engine = engine

    def on_prefill(self, batch, inputs):
        return self.recorder(batch, inputs) if self.recorder is not None else None

    def after_launch(self, info: IterationInfo) -> None:
        self._run(info, graphed=True)

    def after_step(self, info: IterationInfo) -> None:
        self._run(info, graphed=False)

    def _run(self, info, graphed: bool) -> None:
        jobs = [j for j in self.jobs if j.phase == "Running" and (j.graphed is not None) == graphed]
        if jobs:
            used = coserve_iteration(self.engine, jobs, info)
            if self.on_iteration is not None:
                self.on_iteration(info, used)
