"""Sticky rebalance: the current placement (repaired) improved by single-replica moves that cost the fewest bytes.

Why: the balanced greedy ignores where adapters are, so as a hint it would have the solver start from "move nearly
everything" and spend its time walking back. This starts from what is loaded and only moves replicas off the most
loaded worker, each time choosing the move with the fewest bytes per unit of load taken off it, to the least loaded
worker that can take it without growing the anti-affinity excess and without becoming the new maximum (a strict
improvement of the pair, so it terminates). The solver then refines balance and bytes from a low-migration start.
"""

from __future__ import annotations

import numpy as np
from lorafleet.operator.placement.evaluate import Assignment
from lorafleet.operator.placement.greedy import Room
from lorafleet.operator.placement.problem import Problem


def sticky_rebalance(problem: Problem, start: Assignment, target: float, max_steps: int) -> Assignment:
    """Move replicas off the max-loaded worker until it is <= target, no move helps, or max_steps moves were made."""
    assign = [list(ws) for ws in start]
    room = Room(problem)
    held: list[set[int]] = [set() for _ in range(problem.num_workers)]
    for a, ws in enumerate(assign):
        for w in ws:
            room.take(a, w)
            held[w].add(a)
    load = room.load
    for _ in range(max_steps):
        src = int(np.argmax(load))
        if load[src] <= target:
            break
        best: tuple[float, int, int] | None = None  # (KiB per unit of load, adapter, destination)
        for a in sorted(held[src]):
            share = problem.share[a]
            if share <= 0:
                continue
            ok = room.fits(a) & (load + share < load[src])
            ok[np.asarray(assign[a])] = False
            others = {int(problem.node[w]) for w in assign[a] if w != src}
            if others:
                ok &= ~np.isin(problem.node, list(others - {int(problem.node[src])}))
            if not ok.any():
                continue
            cost = problem.size_kib[a] / share
            if best is None or cost < best[0]:
                dest = int(np.flatnonzero(ok)[np.argmin(load[ok])])
                best = (float(cost), a, dest)
        if best is None:
            break
        _, a, dest = best
        _move(problem, room, held, assign, a, src, dest)
    return assign


def _move(problem: Problem, room: Room, held: list[set[int]], assign: Assignment, a: int, src: int, dest: int) -> None:
    room.slots[src] += 1
    room.mem[src] += problem.size_kib[a]
    room.load[src] -= problem.share[a]
    room.count[src] -= 1
    held[src].discard(a)
    room.take(a, dest)
    held[dest].add(a)
    assign[a][assign[a].index(src)] = dest
