"""The solver against exhaustive search on random tiny fleets: same anti-affinity excess and the same max load (up to
the 0.5 % early-stop tolerance), under slots, memory and rank limits."""

from __future__ import annotations

import itertools
import random

import pytest
from lorafleet.operator.placement import Adapter, PlacementParams, Worker, solve

KIB = 1024  # the model accounts memory in whole KiB (sizes rounded up, budgets down)


def _check_valid(assignment: dict[str, list[str]], workers: list[Worker], adapters: list[Adapter]) -> None:
    """Hard constraints of a result: ready workers only, rank, slots, memory, distinct workers per adapter."""
    by_name = {w.name: w for w in workers}
    slots = {w.name: 0 for w in workers}
    mem = {w.name: 0 for w in workers}
    for a in adapters:
        ws = assignment[a.name]
        assert len(ws) == len(set(ws)) <= a.min_replicas
        for name in ws:
            assert by_name[name].ready and a.rank <= by_name[name].max_rank
            slots[name] += 1
            mem[name] += a.size_bytes
    assert all(slots[w.name] <= w.slots and mem[w.name] <= w.memory_bytes for w in workers)


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


def all_placements(workers: list[Worker], adapters: list[Adapter]):
    """Every valid placement as (assignment, excess, max load)."""
    choices = []
    for a in adapters:
        ok = [w for w in workers if a.rank <= w.max_rank and a.size_bytes <= w.memory_bytes]
        choices.append(list(itertools.combinations(ok, a.min_replicas)))
    for combo in itertools.product(*choices):
        slots = {w.name: 0 for w in workers}
        mem = {w.name: 0 for w in workers}
        load = {w.name: w.load for w in workers}
        for a, ws in zip(adapters, combo, strict=True):
            for w in ws:
                slots[w.name] += 1
                mem[w.name] += a.size_bytes
                load[w.name] += a.rate / len(ws)
        if any(slots[w.name] > w.slots or mem[w.name] > w.memory_bytes for w in workers):
            continue
        excess = sum(len(ws) - len({w.node for w in ws}) for ws in combo)
        yield {a.name: {w.name for w in ws} for a, ws in zip(adapters, combo, strict=True)}, excess, max(load.values())


@pytest.mark.parametrize("seed", range(int(__import__("os").environ.get("BRUTE_SEEDS", "12"))))
def test_rebalance_moves_no_more_bytes_than_any_placement_as_good(seed: int):
    """From a random current placement: no valid placement with the same anti-affinity and a max load at most the
    result's loads fewer bytes onto new workers (phase 2 is byte-optimal on tiny fleets; kept placements too)."""
    rng = random.Random(1000 + seed)
    workers = [Worker(f"w{i}", f"n{i % 2}", KIB * 1000, rng.choice([3, 4]), 64, rng.uniform(0, 2)) for i in range(4)]
    adapters = [
        Adapter(f"a{i}", KIB * rng.choice([100, 200, 400]), 8, rng.uniform(0.5, 10), r, r)
        for i, r in enumerate(rng.choices([1, 1, 2], k=5))
    ]
    current = {a.name: set(rng.sample([w.name for w in workers], a.min_replicas)) for a in adapters}
    res = solve(workers, adapters, current, PlacementParams(time_limit_s=2, deterministic=True, seed=seed))
    assert not res.unplaced
    nodes = {w.name: w.node for w in workers}
    excess = sum(len(ws) - len({nodes[x] for x in ws}) for ws in res.assignment.values())
    size = {a.name: a.size_bytes for a in adapters}
    for placement, p_excess, p_load in all_placements(workers, adapters):
        if p_excess <= excess and p_load <= res.objective * (1 - 1e-6):
            moved = sum(size[n] * len(ws - current[n]) for n, ws in placement.items())
            assert res.moved_bytes <= moved, (placement, p_load, res)


@pytest.mark.parametrize("seed", range(int(__import__("os").environ.get("BRUTE_SEEDS", "12"))))
def test_random_fleets_with_current_placements_dead_workers_and_one_to_three_nodes(seed: int):
    """Whatever the current placement: everything is placed when some placement can, with the fewest anti-affinity
    violations, and a max load within the hysteresis band of the best such placement."""
    rng = random.Random(5000 + seed)
    n_nodes = rng.choice([1, 2, 3])
    workers = [
        Worker(
            f"w{i}",
            f"n{i % n_nodes}",
            KIB * rng.choice([300, 600, 1000]),
            rng.choice([1, 2, 3]),
            rng.choice([16, 64]),
            rng.uniform(0, 3),
            rng.random() > 0.15,
        )
        for i in range(rng.choice([3, 4, 5]))
    ]
    adapters = [
        Adapter(
            f"a{i}",
            KIB * rng.choice([100, 200, 400]),
            rng.choice([8, 16, 32]),
            rng.uniform(0, 10),
            r,
            r,
            False,
            rng.choice([0, 1]),
        )
        for i, r in enumerate(rng.choices([1, 1, 2, 3], k=rng.choice([3, 4, 5])))
    ]
    names = [w.name for w in workers]
    current = {a.name: set(rng.sample(names, min(len(names), a.min_replicas))) for a in adapters if rng.random() < 0.7}
    params = PlacementParams(time_limit_s=2, deterministic=True, seed=seed)
    res = solve(workers, adapters, current, params)
    _check_valid(res.assignment, workers, adapters)
    ready = [w for w in workers if w.ready]
    if any(res.replicas[a.name] < a.min_replicas for a in adapters):
        assert res.unplaced  # more replicas than eligible workers: said so
        return
    options = [(e, load) for _, e, load in all_placements(ready, adapters)]
    if not options:
        assert res.unplaced
        return
    assert not res.unplaced
    best_excess = min(e for e, _ in options)
    best_load = min(load for e, load in options if e == best_excess)
    nodes = {w.name: w.node for w in workers}
    assert sum(len(ws) - len({nodes[x] for x in ws}) for ws in res.assignment.values()) == best_excess
    assert res.objective <= best_load * (1 + params.hysteresis) + 1e-9
