"""The solver against exhaustive search on random tiny fleets: same anti-affinity excess and the same max load (up to
the 0.5 % early-stop tolerance), under slots, memory and rank limits."""

from __future__ import annotations

import itertools
import random

import pytest
from lorafleet.operator.placement import Adapter, PlacementParams, Worker, solve

KIB = 1024  # the model accounts memory in whole KiB (sizes rounded up, budgets down)


def brute_force(workers: list[Worker], adapters: list[Adapter]) -> tuple[int, float] | None:
    """(min excess, then min max load) over every valid placement; None when nothing places every replica."""
    choices = []
    for a in adapters:
        ok = [w for w in workers if a.rank <= w.max_rank and a.size_bytes <= w.memory_bytes]
        choices.append(list(itertools.combinations(ok, a.min_replicas)))
    best: tuple[int, float] | None = None
    for combo in itertools.product(*choices):
        slots = {w.name: 0 for w in workers}
        mem = {w.name: 0 for w in workers}
        load = {w.name: w.load for w in workers}
        excess = 0
        for a, ws in zip(adapters, combo, strict=True):
            excess += len(ws) - len({w.node for w in ws})
            for w in ws:
                slots[w.name] += 1
                mem[w.name] += a.size_bytes
                load[w.name] += a.rate / len(ws)
        if any(slots[w.name] > w.slots or mem[w.name] > w.memory_bytes for w in workers):
            continue
        score = (excess, max(load.values()))
        if best is None or score < best:
            best = score
    return best


@pytest.mark.parametrize("seed", range(int(__import__("os").environ.get("BRUTE_SEEDS", "12"))))
def test_matches_exhaustive_search_on_tiny_fleets(seed: int):
    rng = random.Random(seed)
    workers = [
        Worker(
            f"w{i}",
            f"n{i % 2}",
            KIB * rng.choice([300, 500, 1000]),
            rng.choice([2, 3, 4]),
            rng.choice([16, 64]),
            rng.uniform(0, 3),
        )
        for i in range(4)
    ]
    adapters = [
        Adapter(f"a{i}", KIB * rng.choice([100, 200, 400]), rng.choice([8, 16, 32]), rng.uniform(0.5, 10), r, r)
        for i, r in enumerate(rng.choices([1, 1, 1, 2], k=6))
    ]
    best = brute_force(workers, adapters)
    res = solve(workers, adapters, params=PlacementParams(time_limit_s=2, deterministic=True, seed=seed))
    if best is None:
        assert res.unplaced  # nothing places everything: the solver must say what it left out
        return
    assert not res.unplaced
    placed = {w.name: w for w in workers}
    excess = sum(len(ws) - len({placed[x].node for x in ws}) for ws in res.assignment.values())
    assert excess == best[0]
    assert best[1] - 1e-9 <= res.objective <= best[1] * 1.005 + 1e-9
