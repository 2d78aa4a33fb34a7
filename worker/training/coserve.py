"""FlexLLM-style co-serving: fine-tuning takes the leftover token budget of each serving iteration.

Why: a serving iteration has a token budget (max batched tokens); decode-heavy traffic leaves most of it unused.
Fine-tuning fills that leftover, so it costs inference almost nothing. Two mechanisms decide how much of the leftover:
- an AIMD share in [min_share, 1]: when the inference TPOT (the iteration time while decodes are running) gets close
  to the job's target the share halves, when it is comfortably below the share grows additively. It never drops
  below `min_share`, so fine-tuning never starves while there is leftover budget.
- an online linear cost model `t = c0 + c1 * tokens` (least squares over recent iterations) caps the fine-tuning
  tokens so the predicted iteration time stays under the target; the cap never goes under the `min_share` floor.
The hard invariant is `inference_tokens + finetune_tokens <= budget` for every iteration.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


@dataclass
class ShareConfig:
    tpot_target_s: float = 0.05
    min_share: float = 0.05
    initial_share: float = 0.5
    additive_step: float = 0.05
    decrease_factor: float = 0.5
    high_water: float = 0.95  # fraction of the target above which the share is cut
    low_water: float = 0.80  # fraction of the target under which the share grows
    window: int = 64


class LinearCostModel:
    """Least-squares fit of iteration seconds against tokens over a sliding window."""

    def __init__(self, window: int = 64) -> None:
        self._pts: deque[tuple[float, float]] = deque(maxlen=window)

    def add(self, tokens: float, seconds: float) -> None:
        self._pts.append((float(tokens), float(seconds)))

    def fit(self) -> tuple[float, float] | None:
        n = len(self._pts)
        if n < 4:
            return None
        mx = sum(p[0] for p in self._pts) / n
        my = sum(p[1] for p in self._pts) / n
        sxx = sum((p[0] - mx) ** 2 for p in self._pts)
        if sxx <= 1e-9:
            return None
        c1 = sum((p[0] - mx) * (p[1] - my) for p in self._pts) / sxx
        c1 = max(c1, 1e-12)
        return my - c1 * mx, c1


class CoServeScheduler:
    """Plans the fine-tuning tokens of each iteration and adapts its share from observed iteration times."""

    def __init__(self, cfg: ShareConfig) -> None:
        self.cfg = cfg
        self.share = max(cfg.min_share, min(1.0, cfg.initial_share))
        self.cost = LinearCostModel(cfg.window)
        self.history: deque[tuple[int, int, int, float]] = deque(maxlen=4096)  # budget, inf, ft, seconds

    def plan(self, budget: int, inference_tokens: int, decoding: bool) -> int:
        """Fine-tuning tokens for this iteration: never more than the leftover, at least the min-share floor."""
        leftover = max(0, budget - inference_tokens)
        if leftover == 0:
            return 0
        if not decoding:  # no latency-sensitive work in flight: fine-tuning may use the whole leftover
            return leftover
        want = int(leftover * self.share)
        floor = max(1, int(leftover * self.cfg.min_share))
        fit = self.cost.fit()
        if fit is not None:
            c0, c1 = fit
            headroom = (self.cfg.tpot_target_s * self.cfg.high_water - c0) / c1 - inference_tokens
            want = min(want, int(max(0.0, headroom)))
        return max(floor, min(want, leftover))

    def observe(self, budget: int, inference_tokens: int, finetune_tokens: int, seconds: float, decoding: bool) -> None:
        """Feeds one finished iteration; adapts the share (AIMD) when decodes were running."""
        self.cost.add(inference_tokens + finetune_tokens, seconds)
        self.history.append((budget, inference_tokens, finetune_tokens, seconds))
        if not decoding:
            self.share = min(1.0, self.share + self.cfg.additive_step)
            return
        if seconds > self.cfg.tpot_target_s * self.cfg.high_water:
            self.share = max(self.cfg.min_share, self.share * self.cfg.decrease_factor)
        elif seconds < self.cfg.tpot_target_s * self.cfg.low_water:
            self.share = min(1.0, self.share + self.cfg.additive_step)


def coserve_iteration(engine, jobs, info, metrics=None, work=None) -> float:
    """FlexLLM step, run at the end of a serving iteration: each job plans its tokens from the leftover budget
    (AIMD share + cost model), runs that much training, and feeds the iteration's total time back to its
    controller. Shared by the service's iteration hook and the GPU benchmarks. Returns the units used."""
    budget = engine.config.max_num_batched_tokens
    inference = info.num_scheduled_tokens
    decoding = info.num_seqs > 0
    total = 0.0
    for job in jobs:
        if job.spec.mode == "standalone":
            plan = max(0, budget - inference)
        else:
            plan = job.scheduler.plan(budget, inference, decoding)
        t0 = time.perf_counter()
        used = (work(job, plan) if work is not None else job.work(plan)) if plan > 0 else 0.0
        if used and engine.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        job.scheduler.observe(budget, inference, int(used), info.step_seconds + dt, decoding)
        if metrics is not None:
            metrics.share.labels(job.spec.adapter).set(job.scheduler.share)
            metrics.finetune_tokens.observe(used)
        inference += int(used)
        total += used
    return total
