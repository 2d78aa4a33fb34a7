"""Greedy placements: the solver's hint and fallback, the repair of the current placement, and the AIBrix-like baseline.

- `balanced`: longest-processing-time first (replica share descending); each replica goes to the least
  loaded eligible worker with room, on a node the adapter does not use yet when one exists. Complete and fast
  (O(replicas * workers) numpy), within 1 % of the bound on the benchmark's Zipf fleets; the fresh-placement hint.
- `repair`: keeps every still-valid current replica (worker ready, rank/memory allowed, room left, up to the target
  count, distinct nodes first) and places the missing replicas like `balanced`. What "nothing moves" means when the
  current placement breaks capacity or replica bounds (sticky.py then improves it with few moves).
- `least_adapters`: each replica to the worker holding the fewest adapters, ignoring rates: what AIBrix's default
  scheduler does, the baseline the benchmark reports beside ours.
"""

from __future__ import annotations

import numpy as np
from lorafleet.operator.placement.evaluate import Assignment
from lorafleet.operator.placement.problem import Problem


class Room:
    """Remaining slots/memory and running load per worker while a greedy places replicas."""

    def __init__(self, problem: Problem) -> None:
        self.p = problem
        self.slots = problem.slots.copy()
        self.mem = problem.mem_kib.copy()
        self.load = problem.base.copy()
        self.count = np.zeros(problem.num_workers, dtype=np.int64)

    def fits(self, a: int) -> np.ndarray:
        return self.p.eligible[a] & (self.slots > 0) & (self.mem >= self.p.size_kib[a])

    def take(self, a: int, w: int) -> None:
        self.slots[w] -= 1
        self.mem[w] -= self.p.size_kib[a]
        self.load[w] += self.p.share[a]
        self.count[w] += 1


def _lpt_order(problem: Problem, priority_first: bool) -> list[int]:
    """Largest replica share first (LPT). Priority leads only when capacity is short: ahead of share it would put
    small high-priority replicas first and big ones last, which is exactly what makes LPT unbalanced."""
    pri = np.array([a.priority for a in problem.adapters], dtype=np.int64)
    idx = np.arange(problem.num_adapters)
    # lexsort: the last key is the primary one.
    if priority_first:
        return list(np.lexsort((idx, -problem.size_kib, -problem.share, -pri)))
    return list(np.lexsort((idx, -pri, -problem.size_kib, -problem.share)))


def _fill(problem: Problem, room: Room, a: int, ws: list[int], score: np.ndarray, upto: int | None = None) -> None:
    """Add replicas of adapter a to ws until its target count (or `upto`), choosing the lowest `score` worker that
    fits."""
    target = int(problem.replicas[a]) if upto is None else min(upto, int(problem.replicas[a]))
    while len(ws) < target:
        ok = room.fits(a)
        if ws:
            ok[np.asarray(ws)] = False
        if not ok.any():
            return
        spread = ok.copy()
        if ws:
            used = np.zeros(int(problem.node.max()) + 1, dtype=bool)
            used[problem.node[np.asarray(ws)]] = True
            spread &= ~used[problem.node]
        pick = spread if spread.any() else ok
        w = int(np.flatnonzero(pick)[np.argmin(score[pick])])
        room.take(a, w)
        ws.append(w)


def balanced(problem: Problem) -> Assignment:
    """Least-loaded-first LPT greedy (see module docstring); priority-first when LPT leaves replicas unplaced."""
    best: Assignment | None = None
    best_placed = -1
    for priority_first in (False, True):
        room = Room(problem)
        assign: Assignment = [[] for _ in range(problem.num_adapters)]
        order = _lpt_order(problem, priority_first)
        if priority_first:  # short of capacity: every adapter once before any adapter twice
            for a in order:
                _fill(problem, room, a, assign[a], room.load, upto=1)
        for a in order:
            _fill(problem, room, a, assign[a], room.load)
        placed = _weighted_placed(problem, assign)
        if placed > best_placed:
            best, best_placed = assign, placed
        if all(len(ws) == problem.replicas[a] for a, ws in enumerate(assign)):
            break
    assert best is not None
    return best


def _weighted_placed(problem: Problem, assign: Assignment) -> int:
    """Priority-weighted placed replicas, first replicas above all others (the solver's phase-0 objective)."""
    first = int(problem.replicas.sum()) + 1
    return sum(
        max(1, problem.adapters[a].priority + 1) * (len(ws) + first * (len(ws) > 0)) for a, ws in enumerate(assign)
    )


def repair(problem: Problem) -> Assignment:
    """The current placement made valid: keep what still fits, trim extra replicas, add missing ones."""
    room = Room(problem)
    assign: Assignment = [[] for _ in range(problem.num_adapters)]
    order = _lpt_order(problem, priority_first=True)
    for a in order:
        keep: list[int] = []
        seen_nodes: set[int] = set()
        # Distinct nodes first, then lower base load, so trimming keeps the best-spread replicas.
        cur = sorted(problem.current[a], key=lambda w: (int(problem.node[w]) in seen_nodes, problem.base[w], w))
        for w in cur:
            if len(keep) >= problem.replicas[a]:
                break
            if room.fits(a)[w]:
                room.take(a, w)
                keep.append(w)
                seen_nodes.add(int(problem.node[w]))
        assign[a] = keep
    for a in order:
        _fill(problem, room, a, assign[a], room.load)
    return assign


def least_adapters(problem: Problem) -> Assignment:
    """AIBrix-like baseline: adapters in the given order, each replica to the worker with the fewest adapters."""
    room = Room(problem)
    assign: Assignment = [[] for _ in range(problem.num_adapters)]
    for a in range(problem.num_adapters):
        # Ties broken by worker order, as a scheduler iterating a pod list would.
        _fill(problem, room, a, assign[a], room.count.astype(np.float64))
    return assign
