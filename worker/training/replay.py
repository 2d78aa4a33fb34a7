"""General-text replay mixing against forgetting (D-CPT law / DDK idea).

Why: training an adapter only on feedback drifts it away from general language. A fixed fraction `ratio` of the
training samples is drawn from general text. Following DDK, the draw is not uniform over the general domains: each
domain's loss is tracked (EMA) relative to its loss when the job started, and domains where the model is forgetting
most (largest relative increase) are sampled more. The D-CPT idea is the ratio itself being a job knob fitted from
small runs; here it is the `replayRatio` field.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorafleet.worker.training.trainer import TrainSample


@dataclass
class ReplayChunk:
    domain: str
    token_ids: list[int]


class ReplayMixer:
    """Decides, per training sample, feedback vs replay (deterministic interleave at `ratio`) and picks the chunk."""

    def __init__(
        self,
        domains: dict[str, Sequence[Sequence[int]]],
        ratio: float,
        temperature: float = 4.0,
        ema: float = 0.3,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= ratio < 1.0:
            raise ValueError("replay ratio must be in [0, 1)")
        self.domains = {d: [list(c) for c in chunks if len(c) >= 2] for d, chunks in domains.items()}
        self.domains = {d: c for d, c in self.domains.items() if c}
        self.ratio = ratio if self.domains else 0.0
        self.temperature = temperature
        self._ema_w = ema
        self._baseline: dict[str, float] = {}
        self._ema: dict[str, float] = {}
        self._credit = 0.0
        self._rng = random.Random(seed)
        self.drawn: dict[str, int] = {d: 0 for d in self.domains}

    def next_is_replay(self) -> bool:
        """Bresenham-style interleave: exactly round(n * ratio) of the first n samples are replay."""
        if self.ratio <= 0:
            return False
        self._credit += self.ratio
        if self._credit >= 1.0 - 1e-9:
            self._credit -= 1.0
            return True
        return False

    def observe(self, domain: str, loss: float) -> None:
        """Feeds a measured loss of a domain; the first observation becomes its baseline."""
        if not math.isfinite(loss):
            return
        self._baseline.setdefault(domain, loss)
        prev = self._ema.get(domain, loss)
        self._ema[domain] = (1 - self._ema_w) * prev + self._ema_w * loss

    def weights(self) -> dict[str, float]:
        """Sampling weights ∝ exp(temperature · relative loss increase); unobserved domains count as no increase."""
        raw = {}
        for d in self.domains:
            base = self._baseline.get(d)
            rel = 0.0 if base is None or base <= 0 else (self._ema[d] - base) / base
            raw[d] = math.exp(self.temperature * max(-1.0, min(1.0, rel)))
        z = sum(raw.values())
        return {d: v / z for d, v in raw.items()}

    def state(self) -> dict:
        """What a checkpoint keeps, so a resumed job draws the same chunks as an uninterrupted one."""
        version, internal, gauss = self._rng.getstate()
        return {
            "credit": self._credit,
            "baseline": dict(self._baseline),
            "ema": dict(self._ema),
            "drawn": dict(self.drawn),
            "rng": [version, list(internal), gauss],
        }

    def restore(self, st: dict) -> None:
        self._credit = float(st["credit"])
        self._baseline = dict(st["baseline"])
        self._ema = dict(st["ema"])
        self.drawn.update(st["drawn"])
        version, internal, gauss = st["rng"]
        self._rng.setstate((version, tuple(internal), gauss))

    def draw(self) -> ReplayChunk:
        w = self.weights()
        names = list(w)
        domain = self._rng.choices(names, weights=[w[n] for n in names])[0]
        self.drawn[domain] += 1
        return ReplayChunk(domain, self._rng.choice(self.domains[domain]))


def weigh_group(samples: Sequence[TrainSample]) -> int:
    """Sets the loss weight of a group's replay samples and returns the group's loss denominator.

    Why: replay chunks are long (128 tokens) next to a typical feedback completion (10-30 tokens); under one token
    mean over all rows they take most of a step's gradient (at `replayRatio` 0.25, about 70%), which starves the
    task. Here the task term is the feedback samples' token mean (denominator = their loss tokens: exactly the loss
    an offline transformers + peft loop computes on the same feedback), and every replay sample weighs as much as
    an average feedback sample, whatever its length:

        loss = Σ_feedback w·CE / N_fb  +  Σ_replay (N_fb / n_fb) / N_r · CE / N_fb
             = mean_fb  +  (k / n_fb) · mean over the k replay samples of their token-mean CE

    so replay holds the fraction k / (k + n_fb) of the step's loss weight: `replayRatio` is both the share of
    samples and the share of gradient weight that is general text. A group without feedback keeps the plain token
    mean (nothing to normalise by). The replay samples' `weight` is overwritten; feedback weights are kept."""
    fb = [s for s in samples if s.domain is None]
    replay = [s for s in samples if s.domain is not None]
    n_fb = sum(s.loss_tokens for s in fb)
    if not fb or n_fb == 0:
        for s in replay:
            s.weight = 1.0
        return max(1, sum(s.loss_tokens for s in samples))
    per_sample = n_fb / len(fb)
    for s in replay:
        s.weight = per_sample / max(1, s.loss_tokens)
    return n_fb


def chunk_tokens(ids: Sequence[int], size: int) -> list[list[int]]:
    """Splits a token stream into training chunks of `size` tokens (the last, shorter one kept if >= size/4)."""
    out = [list(ids[i : i + size]) for i in range(0, len(ids), size)]
    return [c for c in out if len(c) >= max(2, size // 4)]


def builtin_general_text() -> dict[str, str]:
    """General English prose available offline everywhere: standard-library module documentation, by area."""
    import importlib

    areas = {
        "text": ["textwrap", "string", "difflib", "html", "email", "csv"],
        "system": ["os", "subprocess", "shutil", "tempfile", "logging", "argparse"],
        "data": ["collections", "heapq", "bisect", "fractions", "decimal", "statistics"],
    }
    out: dict[str, str] = {}
    for area, mods in areas.items():
        parts = []
        for m in mods:
            try:
                mod = importlib.import_module(m)
            except ImportError:
                continue
            doc = mod.__doc__ or ""
            parts.append(doc)
            for name in sorted(dir(mod))[:40]:
                obj = getattr(mod, name, None)
                d = getattr(obj, "__doc__", None)
                if isinstance(d, str) and len(d) > 80 and callable(obj):
                    parts.append(d)
        out[area] = "\n\n".join(p.strip() for p in parts if p.strip())
    return out
