"""The executor: a job's accumulation groups (from `source(step)`, the planner) as pieces within a token budget.

Each group is packed into micro-batches, each launched as one piece (`graphed.py`) while the controller
(`coserve.OverlapController`) allows more; the `Sink` (the job) books results once their pieces complete (`drain`).
Why an optimizer step launches only once the previous step's results are back: at most one step is ever undrained,
so host-side bookkeeping (loss, publish, checkpoint) always sees the weights of its step. Costs are token units
(1 = one token's forward).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from lorafleet.worker.training.coserve import OverlapController
from lorafleet.worker.training.graphed import GraphedTrainer
from lorafleet.worker.training.packing import MicroBatch, sample_tokens
from lorafleet.worker.training.planner import Group, GroupStats
from lorafleet.worker.training.trainer import TrainSample


class Sink(Protocol):
    """Where an executor's results go (the job)."""

    def running(self) -> bool: ...

    def sample_done(self, s: TrainSample, loss_sum: float, n_tokens: int, stats: GroupStats) -> None: ...

    def step_done(self, stats: GroupStats) -> None: ...

    def barrier(self, step: int) -> bool:
        """Whether optimizer step `step` checkpoints, publishes or ends the job (no group may form until it lands)."""
        ...


class Executor:
    def __init__(
        self, graphed: GraphedTrainer, controller: OverlapController, source: Callable[[int], Group | None], sink: Sink
    ) -> None:
        self.g = graphed
        self.t = graphed.t
        self.controller = controller  # may this piece launch now?
        self.source = source
        self.sink = sink
        self._group: Group | None = None  # formed, its stale prefixes not all recomputed yet
        self._mbs: deque[MicroBatch] = deque()  # launched-in-order micro-batches of the current group
        self._run: Group | None = None
        self._steps_undrained = 0
        self._barrier = False  # a launched step must be drained before the next group forms (checkpoint/publish)

    @property
    def busy(self) -> bool:
        """Launched work is still running on the GPU (the idle driver polls instead of sleeping)."""
        return bool(self.g.pending)

    def _prepare(self, budget: float) -> float | None:
        """Forms the next group and recomputes stale prefixes (no grad); the units used, None = nothing to run."""
        if self._group is None:
            self._group = self.source(self.t.step)
            if self._group is None:
                return None
        used = 0.0
        for item in self._group.items:  # stale stashes with the recompute policy: prefix forward, no grad
            if item.prompt_to_recompute:
                cost = len(item.sample.prompt_ids) - 1
                if cost > budget - used:
                    return None if used == 0 else used
                item.sample.prefix_kv = self.t.prompt_kv(item.sample.prompt_ids)
                item.prompt_to_recompute = False
                used += cost
        return used

    def work(self, budget: float) -> float:
        """Launches pieces (a micro-batch costs 2 x its tokens) worth at most `budget` units; returns the units used."""
        g, ctl = self.g, self.controller
        self.drain()
        used = 0.0
        while self.sink.running():
            if self._run is None:
                if self._barrier:
                    break
                u = self._prepare(budget - used)
                if u is None:
                    break
                used += u
                if any(i.prompt_to_recompute for i in self._group.items):
                    break
                self._mbs = deque(g.pack([i.sample for i in self._group.items], self._group.stats.denom))
                self._run, self._group = self._group, None
            if self._mbs:
                cost = self._mbs[0].cost
                if g.inflight >= ctl.allowed or cost > budget - used:
                    break
                predicted = g.predict_seconds(cost)
                if not ctl.may_launch(predicted):
                    break
                ctl.spend(predicted)
                g.launch(self._mbs.popleft(), tag=self._run)
                used += cost
                continue
            if self._steps_undrained:
                break
            run, self._run = self._run, None
            self._barrier = self.sink.barrier(self.t.step + 1)
            g.launch_step(tag=run)
            self._steps_undrained += 1
        return used

    def drain(self) -> None:
        """Books the results of finished pieces, in launch order."""
        for p in self.g.completed():
            run: Group = p.tag
            if p.kind == "micro":
                mb = p.batch
                sums: dict[int, float] = {}
                for owner, v in zip(mb.owners, p.host[: len(mb.owners)].double().tolist(), strict=True):
                    sums[owner] = sums.get(owner, 0.0) + v
                for i in mb.samples:
                    s = run.items[i].sample
                    self.sink.sample_done(s, sums.get(i, 0.0) * s.weight, sample_tokens(s), run.stats)
            else:
                self._steps_undrained -= 1
                self._barrier = False
                self.sink.step_done(run.stats)

    def reset(self) -> None:
        """Drops in-flight work and its gradients (a rollback: it read the refused weights)."""
        self.g.reset()
        self._mbs.clear()
        self._run = None
        self._steps_undrained = 0
        self._barrier = False

    def stop(self) -> None:
        """Drops everything planned or running (a stopped job)."""
        self._group = None
        self.reset()
