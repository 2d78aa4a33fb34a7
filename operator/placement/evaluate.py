"""Numbers of one assignment (worker loads, anti-affinity excess, bytes moved) and a lower bound on the best max load.

Shared by the greedy heuristics, the solver and the tests, so every path scores a placement the same way.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from lorafleet.operator.placement.problem import Problem

Assignment = list[list[int]]  # per adapter index: worker indices (usable workers)


def flatten(assign: Assignment) -> tuple[np.ndarray, np.ndarray]:
    """(adapter index, worker index) of every placed replica, as two int64 arrays (vectorised scoring)."""
    lens = np.fromiter((len(ws) for ws in assign), dtype=np.int64, count=len(assign))
    workers = np.fromiter((w for ws in assign for w in ws), dtype=np.int64, count=int(lens.sum()))
    return np.repeat(np.arange(len(assign), dtype=np.int64), lens), workers


def worker_loads(problem: Problem, assign: Assignment) -> np.ndarray:
    """Base load plus each adapter's rate split evenly over the replicas it actually got (more per replica than the
    planned share when capacity left some out)."""
    ads, ws = flatten(assign)
    got = np.bincount(ads, minlength=problem.num_adapters)
    per_replica = problem.share * problem.replicas / np.maximum(got, 1)
    return problem.base + np.bincount(ws, weights=per_replica[ads], minlength=problem.num_workers)


def anti_affinity_excess(problem: Problem, assign: Assignment) -> int:
    """Replicas that share a node with another replica of the same adapter (0 = all spread across nodes)."""
    excess = 0
    for ws in assign:
        if len(ws) > 1:
            excess += len(ws) - len({int(problem.node[w]) for w in ws})
    return excess


def moved_kib(problem: Problem, assign: Assignment) -> int:
    """KiB that must be loaded onto workers that do not hold the adapter now (the migration cost)."""
    return int(
        sum(problem.size_kib[a] * sum(1 for w in ws if w not in problem.current[a]) for a, ws in enumerate(assign))
    )


def moved_bytes(problem: Problem, assign: Assignment) -> int:
    """Bytes loaded onto workers that did not list the adapter in the current placement."""
    total = 0
    for a, ws in enumerate(assign):
        cur = problem.current_names[a]
        total += problem.adapters[a].size_bytes * sum(1 for w in ws if problem.workers[w].name not in cur)
    return total


def shortfall(problem: Problem, assign: Assignment) -> Counter[int]:
    """Adapter index -> replicas missing against the target count."""
    return Counter(
        {a: int(problem.replicas[a]) - len(ws) for a, ws in enumerate(assign) if len(ws) < problem.replicas[a]}
    )


def relaxation_bound(problem: Problem) -> float:
    """A lower bound on the max worker load of *any* placement (all workers, no capacity limits).

    max of: the water level that spreads all adapter load over the workers' base loads (fractional, capacity-free), the
    largest base load, and for each adapter its replica share plus the smallest base load among workers that can hold
    it. CP-SAT's own bound only covers the candidate-restricted model, so this one is what the reported gap is against.
    """
    if problem.num_workers == 0:
        return 0.0
    base = np.sort(problem.base)
    total = float((problem.share * problem.replicas).sum())
    bound = float(base[-1])
    # Water filling: smallest M with sum(max(0, M - base_w)) >= total.
    prefix = np.cumsum(base)
    for k in range(1, len(base) + 1):
        level = (total + prefix[k - 1]) / k
        if k == len(base) or level <= base[k]:
            bound = max(bound, level)
            break
    placed = problem.replicas > 0
    if placed.any():
        masked = np.where(problem.eligible[placed], problem.base[None, :], np.inf)
        per_adapter = problem.share[placed] + masked.min(axis=1)
        bound = max(bound, float(per_adapter[np.isfinite(per_adapter)].max(initial=0.0)))
    return bound


def excess_floor(problem: Problem) -> int:
    """Anti-affinity excess that no placement avoids: replicas beyond the distinct nodes of an adapter's eligible
    workers."""
    total = 0
    for a in np.flatnonzero(problem.replicas >= 2):
        nodes = np.unique(problem.node[problem.eligible[a]]).size
        total += max(0, int(problem.replicas[a]) - nodes)
    return total
