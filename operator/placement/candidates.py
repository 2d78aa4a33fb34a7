"""Candidate workers per adapter: the sparse part of the model that makes CP-SAT fast at fleet scale.

A full adapters x workers boolean model does not scale (1000 x 64 found nothing in 5 s on 2 cores).
Each adapter may only go to: its current workers (so "nothing moves" is always representable), the workers of every
hint (so the greedy solution is feasible in the model), and k more eligible workers: half the least loaded in the
hint among a seeded random sample, half random. Random extras make the candidate graph an expander, so load can flow
from any hot worker to any cold one through a chain of swaps; least-loaded extras give direct exits.
"""

from __future__ import annotations

import numpy as np
from lorafleet.operator.placement.evaluate import Assignment
from lorafleet.operator.placement.problem import Problem


def candidate_sets(
    problem: Problem, hints: list[Assignment], hint_loads: np.ndarray, k: int, seed: int
) -> list[list[int]]:
    """Sorted candidate worker indices per adapter (empty for adapters with no replica to place)."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = []
    for a in range(problem.num_adapters):
        if problem.replicas[a] == 0:
            out.append([])
            continue
        chosen = set(problem.current[a])
        for h in hints:
            chosen.update(h[a])
        mask = problem.eligible[a].copy()
        mask[list(chosen)] = False
        pool = np.flatnonzero(mask)
        if k > 0 and pool.size:
            sample = pool if pool.size <= 3 * k else rng.choice(pool, size=3 * k, replace=False)
            by_load = sample[np.argsort(hint_loads[sample], kind="stable")]
            low = by_load[: (k + 1) // 2]
            rest = by_load[(k + 1) // 2 :]
            extra = rng.choice(rest, size=min(k - low.size, rest.size), replace=False) if rest.size else rest
            chosen.update(int(w) for w in low)
            chosen.update(int(w) for w in extra)
        out.append(sorted(chosen))
    return out
