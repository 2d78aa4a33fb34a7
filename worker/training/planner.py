"""The feedback planner of a job: which samples form the next accumulation group.

Data: new feedback first (FIFO), then earlier feedback again up to `epochs` passes; a deterministic
`heldoutFraction` of feedback (by id hash) is never trained on and measures held-out loss; `replayRatio` of the
samples are general replay text (replay.py). Feedback about a served request whose prompt state was stashed reuses
it if it is at most `maxActivationStaleness` optimizer steps old, else it is recomputed (prefix forward under
no-grad) or dropped. What was taken is known by feedback id (`uses`), not by position: a job that moved to another
worker sees the pool's feedback in another order (its own log first).

The decisions (`admit`, `stash_choice`) are pure functions; `FeedbackPlanner` holds the queues they act on.
Feedback arrives from HTTP threads through a thread-safe deque (`offer`); everything else runs in the engine thread.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from lorafleet.worker.feedback.store import FeedbackSample
from lorafleet.worker.training.replay import ReplayMixer, weigh_group
from lorafleet.worker.training.spec import JobSpec
from lorafleet.worker.training.stash import ActivationStash
from lorafleet.worker.training.trainer import LoRATrainer, TrainSample

MAX_HELDOUT = 64


@dataclass
class GroupStats:
    """Loss accounting of one accumulation group (groups overlap in flight on the asynchronous path)."""

    denom: int
    started: float
    loss: float = 0.0
    tokens: int = 0
    fb_loss: float = 0.0
    fb_tokens: int = 0


@dataclass
class Item:
    """A planned sequence of an accumulation group."""

    sample: TrainSample
    prompt_to_recompute: bool = False
    feedback: FeedbackSample | None = None


@dataclass
class Group:
    items: list[Item]
    stats: GroupStats


def heldout_key(feedback_id: str) -> float:
    """A feedback id's place in [0, 1]: below `heldoutFraction` it is held out, on every worker and restart."""
    return int(hashlib.sha256(feedback_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def admit(s: FeedbackSample, spec: JobSpec) -> str:
    """What to do with an offered sample: `ignore` (not this job's), `reject`, `heldout` or `train`."""
    if s.adapter != spec.adapter or s.seq < spec.since_seq:
        return "ignore"
    if s.kind not in spec.kinds or not s.trainable or (s.kind == "reward" and s.weight <= spec.min_reward):
        return "reject"
    return "heldout" if heldout_key(s.feedback_id) < spec.heldout_fraction else "train"


def truncate(s, max_tokens: int):
    """A sample (feedback or training) cut to `max_tokens` prompt + completion tokens (the prompt loses its start,
    the completion its end), or itself."""
    if len(s.prompt_ids) + len(s.completion_ids) <= max_tokens:
        return s
    s = copy.copy(s)
    keep = max(1, max_tokens - len(s.completion_ids))
    s.prompt_ids = s.prompt_ids[-keep:]
    s.completion_ids = s.completion_ids[: max_tokens - 1]
    return s


def stash_choice(usable: bool, staleness: int, max_staleness: int, stale_policy: str) -> str:
    """How a stashed prompt state is used: `full` (unusable: another prompt, or more prefix keys than a micro-batch
    holds; plain forward), `reused`, `recomputed` or `dropped`."""
    if not usable:
        return "full"
    if staleness <= max_staleness:
        return "reused"
    return "dropped" if stale_policy == "drop" else "recomputed"


class FeedbackPlanner:
    def __init__(
        self,
        spec: JobSpec,
        replay: ReplayMixer,
        stash: ActivationStash | None,
        counts: dict,
        on_stash: Callable[[str], None],
        trainer: LoRATrainer,
        max_tokens: int,
    ) -> None:
        self.spec = spec
        self.replay = replay
        self.stash = stash
        self.device, self.dtype = trainer.device, trainer.dtype  # where reused prompt K/V go
        self.max_tokens, self.max_prefix = max_tokens, spec.graph_prefix  # the tokens / prefix keys of a micro-batch
        self.counts = counts  # the job's sample counters (shared: status and checkpoints read them)
        self.on_stash = on_stash  # called with reused | recomputed | dropped
        self.rng = torch.Generator().manual_seed(spec.seed)
        self.uses: dict[str, int] = {}
        self.heldout: list[FeedbackSample] = []
        self._incoming: deque[FeedbackSample] = deque()
        self._fresh: deque[FeedbackSample] = deque()
        self._pool: list[FeedbackSample] = []
        self._seen: set[str] = set()  # ids absorbed (a peer's log read at the start and a poll may both offer one)

    def offer(self, s: FeedbackSample) -> None:
        """Any thread."""
        self._incoming.append(s)

    def _absorb(self) -> None:
        while self._incoming:
            s = self._incoming.popleft()
            if s.feedback_id in self._seen:
                continue
            verdict = admit(s, self.spec)
            if verdict == "ignore":
                continue
            self._seen.add(s.feedback_id)
            if verdict == "reject":
                self.counts["rejected"] += 1
                continue
            s = truncate(s, self.spec.max_seq_tokens)
            self.counts["available"] += 1
            if verdict == "heldout" and len(self.heldout) < MAX_HELDOUT:
                self.heldout.append(s)
                self.counts["heldout"] += 1
                if self.stash is not None and s.request_id:
                    self.stash.abort(s.request_id)
                continue
            if self.uses.get(s.feedback_id, 0) == 0:  # not taken (and trained on) before the resumed checkpoint
                self._fresh.append(s)
            self._pool.append(s)

    def _has_feedback(self) -> bool:
        return bool(self._fresh) or any(self.uses.get(s.feedback_id, 0) < self.spec.epochs for s in self._pool)

    def _next_feedback(self) -> FeedbackSample | None:
        if self._fresh:
            return self._fresh.popleft()
        candidates = [s for s in self._pool if self.uses.get(s.feedback_id, 0) < self.spec.epochs]
        if not candidates:
            return None
        return candidates[int(torch.randint(len(candidates), (1,), generator=self.rng))]

    def next_group(self, step: int) -> Group | None:
        """The next accumulation group at optimizer step `step` (for stash staleness), or None: no feedback left."""
        self._absorb()
        if not self._has_feedback():
            return None
        n = self.spec.optim.grad_accumulation
        items: list[Item] = []
        tries = 0
        while len(items) < n and tries < 4 * n:
            tries += 1
            if self.replay.next_is_replay():
                ch = self.replay.draw()
                ids = ch.token_ids[: self.max_tokens + 1]
                items.append(Item(TrainSample(ids[:1], ids[1:], 1.0, domain=ch.domain)))
                continue
            fb = self._next_feedback()
            if fb is None:
                break
            self.uses[fb.feedback_id] = self.uses.get(fb.feedback_id, 0) + 1
            item = self._plan_feedback(fb, step)
            if item is not None:
                items.append(item)
        if not any(i.feedback is not None for i in items):
            return None
        return Group(items, GroupStats(weigh_group([i.sample for i in items]), time.perf_counter()))

    def _plan_feedback(self, fb: FeedbackSample, step: int) -> Item | None:
        """A feedback sample as it trains: against its stashed prompt state (only the completion is forwarded, cut to
        a micro-batch) or as a plain forward (cut to a micro-batch, the prompt losing its start)."""
        sample = TrainSample(fb.prompt_ids, fb.completion_ids, min(1.0, fb.weight), source=fb.feedback_id)
        full = Item(truncate(sample, self.max_tokens + 1), feedback=fb)
        entry = self.stash.take(fb.request_id) if self.stash is not None and fb.request_id else None
        if entry is None:  # never stashed / evicted / already used
            return full
        usable = list(entry.prompt_ids) == list(fb.prompt_ids) and len(fb.prompt_ids) - 1 <= self.max_prefix
        choice = stash_choice(usable, step - entry.version_step, self.spec.max_staleness, self.spec.stale_policy)
        sample.completion_ids = sample.completion_ids[: self.max_tokens]
        if choice == "reused":
            kv = self.stash.load(entry, self.device, self.dtype)
            n = len(fb.prompt_ids) - 1
            sample.prefix_kv = [(k[:n], v[:n]) for k, v in kv]
        else:
            self.stash.load(entry, "cpu")  # releases its arena space
        if choice == "full":
            return full
        self.on_stash(choice)
        if choice == "dropped":
            return None
        return Item(sample, prompt_to_recompute=choice == "recomputed", feedback=fb)

    def state(self) -> dict:
        return {"uses": dict(self.uses)}

    def restore(self, data: dict) -> None:
        self.uses = {str(k): int(v) for k, v in (data.get("uses") or {}).items()}
