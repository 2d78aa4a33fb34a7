"""Placement solver: hand-checkable optima, capacity, replica bounds, rank limits, anti-affinity, hysteresis, fallback,
infeasible demands and determinism. Everything runs the real CP-SAT solver (no mocks); each case is tiny and fast."""

from __future__ import annotations

import random

import pytest
from lorafleet.operator.placement import Adapter, PlacementParams, PlacementResult, PlacementStatus, Worker, diff, solve
from lorafleet.operator.placement.problem import desired_replicas

KIB = 1024
FAST = PlacementParams(time_limit_s=2.0, deterministic=True, seed=7)


def w(
    name: str,
    node: str | None = None,
    *,
    mem: int = 1 << 30,
    slots: int = 16,
    rank: int = 64,
    load: float = 0.0,
    ready: bool = True,
) -> Worker:
    return Worker(name, node or f"node-{name}", mem, slots, rank, load, ready)


def ad(
    name: str,
    rate: float,
    *,
    size: int = 10 * KIB,
    rank: int = 8,
    r: int = 1,
    rmax: int | None = None,
    auto: bool = False,
    pri: int = 0,
) -> Adapter:
    return Adapter(name, size, rank, rate, r, rmax if rmax is not None else r, auto, pri)


def check_valid(res: PlacementResult, workers: list[Worker], adapters: list[Adapter]) -> None:
    """Every hard constraint, recomputed from the result: capacity, rank, readiness, distinct workers, loads."""
    by_name = {x.name: x for x in workers}
    used_slots = {x.name: 0 for x in workers}
    used_mem = {x.name: 0 for x in workers}
    loads = {x.name: x.load for x in workers if x.ready}
    for a in adapters:
        ws = res.assignment[a.name]
        assert len(ws) == len(set(ws)), f"{a.name} has two replicas on one worker"
        if a.name not in res.unplaced:
            assert len(ws) == res.replicas[a.name]
        for name in ws:
            worker = by_name[name]
            assert worker.ready and a.rank <= worker.max_rank
            used_slots[name] += 1
            used_mem[name] += a.size_bytes
            loads[name] += a.rate / len(ws)
    for x in workers:
        assert used_slots[x.name] <= x.slots and used_mem[x.name] <= x.memory_bytes
    for name, load in res.loads.items():
        assert load == pytest.approx(loads[name])
    assert res.objective == pytest.approx(max(res.loads.values(), default=0.0))


def test_three_workers_rates_6_3_3_max_load_6_and_one_adapter_each():
    workers = [w("w0"), w("w1"), w("w2")]
    adapters = [ad("a", 6), ad("b", 3), ad("c", 3)]
    res = solve(workers, adapters, params=FAST)
    check_valid(res, workers, adapters)
    assert res.objective == pytest.approx(6.0)
    assert res.status is PlacementStatus.OPTIMAL and res.gap == pytest.approx(0.0)
    # The spread term: same max load, but no worker idles while another holds two adapters.
    assert sorted(res.loads.values()) == [3.0, 3.0, 6.0]
    assert res.moved_bytes == 3 * 10 * KIB  # nothing was placed before: every byte is loaded


def test_slots_force_a_split_away_from_the_unconstrained_optimum():
    # Without slots: {4} | {1,1,1} -> max 4. With 2 slots per worker: {4,1} | {1,1} -> max 5.
    adapters = [ad("big", 4), ad("s1", 1), ad("s2", 1), ad("s3", 1)]
    free = solve([w("w0"), w("w1")], adapters, params=FAST)
    assert free.objective == pytest.approx(4.0)
    workers = [w("w0", slots=2), w("w1", slots=2)]
    res = solve(workers, adapters, params=FAST)
    check_valid(res, workers, adapters)
    assert res.objective == pytest.approx(5.0) and not res.unplaced


def test_memory_budget_keeps_two_large_adapters_apart():
    # Balance alone would pair big-a with tiny rate; memory allows only one 600 KiB adapter per worker.
    workers = [w("w0", mem=1000 * KIB), w("w1", mem=1000 * KIB)]
    adapters = [ad("big-a", 1, size=600 * KIB), ad("big-b", 1, size=600 * KIB), ad("hot", 2, size=10 * KIB)]
    res = solve(workers, adapters, params=FAST)
    check_valid(res, workers, adapters)
    assert res.assignment["big-a"] != res.assignment["big-b"]
    assert res.objective == pytest.approx(3.0)


def test_replica_bounds_fixed_and_auto():
    workers = [w(f"w{i}") for i in range(5)]
    adapters = [
        ad("fixed3", 9, r=3),  # fixed: min_replicas
        ad("auto", 10, r=1, rmax=2, auto=True),  # ceil(10 / 4) = 3 -> capped at max 2
        ad("auto-cold", 1, r=1, rmax=4, auto=True),  # ceil(1 / 4) = 1
    ]
    res = solve(
        workers, adapters, params=PlacementParams(time_limit_s=2, deterministic=True, per_replica_target_rate=4)
    )
    check_valid(res, workers, adapters)
    assert res.replicas == {"fixed3": 3, "auto": 2, "auto-cold": 1}
    assert len(set(res.assignment["fixed3"])) == 3 and len(res.assignment["auto"]) == 2
    # Shares: fixed3 3 x 3, auto 2 x 5, cold 1 -> best max load is 5 (a worker holding one auto replica alone).
    assert res.objective == pytest.approx(5.0)


def test_auto_replicas_have_hysteresis():
    a = ad("x", 0, r=1, rmax=8, auto=True)
    p = PlacementParams(per_replica_target_rate=10, hysteresis=0.1)
    assert desired_replicas(a.__class__(**{**a.__dict__, "rate": 25}), 0, p) == 3
    # With 3 replicas now, 31 (< 3 * 10 * 1.1 = 33) keeps 3; 34 grows to 4; 19 (> 2 * 10 / 1.1) keeps 3; 18 shrinks.
    for rate, want in ((31, 3), (34, 4), (19, 3), (18, 2)):
        assert desired_replicas(a.__class__(**{**a.__dict__, "rate": rate}), 3, p) == want


def test_rank_limits_and_rank_over_every_worker():
    workers = [w("small", rank=16), w("large", rank=64, load=5)]
    adapters = [ad("r32", 1, rank=32), ad("r8", 1, rank=8), ad("r128", 1, rank=128)]
    res = solve(workers, adapters, params=FAST)
    check_valid(res, workers, adapters)
    assert res.assignment["r32"] == ["large"]  # although "large" is the busier worker
    assert res.assignment["r8"] == ["small"]
    assert res.assignment["r128"] == []
    assert res.unplaced["r128"].startswith("RankTooHigh") and "largest 64" in res.unplaced["r128"]
    assert res.status is PlacementStatus.INFEASIBLE_PARTIAL


def _two_nodes() -> list[Worker]:
    # node-a is idle, node-b carries base load 5 on both workers.
    return [w("a0", "node-a"), w("a1", "node-a"), w("b0", "node-b", load=5), w("b1", "node-b", load=5)]


def test_anti_affinity_spreads_replicas_across_nodes_before_balance():
    adapters = [ad("ha", 20, r=2)]  # 2 replicas of share 10
    res = solve(_two_nodes(), adapters, params=FAST)
    check_valid(res, _two_nodes(), adapters)
    nodes = {x.name: x.node for x in _two_nodes()}
    assert {nodes[x] for x in res.assignment["ha"]} == {"node-a", "node-b"}
    assert res.objective == pytest.approx(15.0)
    # Without anti-affinity both replicas sit on the idle node: max load 10.
    off = solve(_two_nodes(), adapters, params=PlacementParams(time_limit_s=2, deterministic=True, anti_affinity=False))
    assert {nodes[x] for x in off.assignment["ha"]} == {"node-a"} and off.objective == pytest.approx(10.0)


def test_anti_affinity_is_soft_when_there_is_one_node():
    workers = [w("w0", "only"), w("w1", "only"), w("w2", "only")]
    res = solve(workers, [ad("x", 3, r=3)], params=FAST)
    assert sorted(res.assignment["x"]) == ["w0", "w1", "w2"] and not res.unplaced


def _fleet(n_adapters: int, n_workers: int, seed: int) -> tuple[list[Worker], list[Adapter]]:
    rng = random.Random(seed)
    workers = [
        w(
            f"w{i:02d}",
            f"n{i // 4}",
            slots=2 * n_adapters // n_workers + 2,
            rank=16 if i % 4 == 3 else 64,
            load=rng.uniform(0, 1),
        )
        for i in range(n_workers)
    ]
    adapters = [
        ad(
            f"a{i:03d}",
            50.0 / (i + 1),
            size=rng.choice([8, 16, 32, 64]) * 3 * KIB,
            rank=rng.choice([8, 16, 32]),
            r=1 + (i % 7 == 0),
        )
        for i in range(n_adapters)
    ]
    return workers, adapters


def test_hysteresis_small_rate_change_moves_nothing():
    workers, adapters = _fleet(60, 8, seed=1)
    first = solve(workers, adapters, params=FAST)
    check_valid(first, workers, adapters)
    current = {k: set(v) for k, v in first.assignment.items()}
    rng = random.Random(2)
    noisy = [Adapter(**{**a.__dict__, "rate": a.rate * rng.uniform(0.98, 1.02)}) for a in adapters]
    again = solve(workers, noisy, current, params=FAST)
    assert again.kept_current and again.moved_bytes == 0
    assert diff(current, again.assignment) == []


def test_big_skew_moves_and_moves_the_fewest_bytes():
    workers = [w("w0"), w("w1"), w("w2")]
    adapters = [
        ad("heavy-bytes", 5, size=1000 * KIB),
        ad("light-bytes", 5, size=10 * KIB),
        ad("other", 5, size=500 * KIB),
    ]
    current = {"heavy-bytes": {"w0"}, "light-bytes": {"w0"}, "other": {"w0"}}  # everything on w0: load 15
    res = solve(workers, adapters, current, params=FAST)
    check_valid(res, workers, adapters)
    assert res.objective == pytest.approx(5.0) and not res.kept_current
    # Optimal balance needs two adapters off w0; the cheapest two are light-bytes and other.
    assert res.assignment["heavy-bytes"] == ["w0"]
    assert res.moved_bytes == 510 * KIB


def test_dead_worker_replicas_are_replaced_and_moved_away():
    workers = [w("w0"), w("w1", ready=False), w("w2")]
    adapters = [ad("x", 1), ad("y", 1)]
    current = {"x": {"w1"}, "y": {"w0"}}
    res = solve(workers, adapters, current, params=FAST)
    check_valid(res, workers, adapters)
    assert res.assignment["y"] == ["w0"] and res.assignment["x"] == ["w2"]
    assert diff(current, res.assignment) == [diff.__globals__["Move"]("x", "w2", "w1")]


def test_zero_time_limit_uses_the_greedy_fallback():
    workers, adapters = _fleet(40, 6, seed=3)
    res = solve(workers, adapters, params=PlacementParams(time_limit_s=0))
    check_valid(res, workers, adapters)
    assert res.status is PlacementStatus.GREEDY_FALLBACK and res.solver_status == "NOT_RUN"
    assert all(len(res.assignment[a.name]) == res.replicas[a.name] for a in adapters)
    assert res.max_over_mean < 1.3


def test_infeasible_demands_place_what_fits_and_say_why():
    workers = [w("w0", slots=2, mem=100 * KIB), w("w1", slots=2, mem=100 * KIB), w("down", ready=False)]
    adapters = [
        ad("five", 1, r=5),  # more replicas than workers
        ad("huge", 1, size=500 * KIB),  # over every memory budget
        ad("rank", 1, rank=128),  # over every rank limit
        ad("one", 1),
        ad("two", 1),
        ad("three", 1),
    ]
    res = solve(workers, adapters, params=FAST)
    check_valid(res, workers, adapters)
    assert res.status is PlacementStatus.INFEASIBLE_PARTIAL
    assert res.unplaced["five"].startswith("TooManyReplicas: wants 5 replicas but only 2") and res.replicas["five"] == 2
    assert res.unplaced["huge"].startswith("TooLarge") and res.assignment["huge"] == []
    assert res.unplaced["rank"].startswith("RankTooHigh") and res.assignment["rank"] == []
    # 4 slots for 5 wanted replicas: every adapter is served once before "five" gets its second replica.
    assert [len(res.assignment[n]) for n in ("five", "one", "two", "three")] == [1, 1, 1, 1]
    assert res.unplaced["five"].endswith("InsufficientCapacity: placed 1 of 2 replicas; slots or memory exhausted")
    assert set(res.unplaced) == {"five", "huge", "rank"}


def test_priority_wins_the_last_slot():
    workers = [w("w0", slots=1)]
    res = solve(workers, [ad("low", 5), ad("vip", 1, pri=3)], params=FAST)
    assert res.assignment == {"low": [], "vip": ["w0"]}
    assert res.unplaced["low"].startswith("InsufficientCapacity: placed 0 of 1")


def test_no_ready_worker():
    res = solve([w("w0", ready=False)], [ad("x", 1)], params=FAST)
    assert res.unplaced == {"x": "NoReadyWorkers: no worker is ready"} and res.assignment == {"x": []}


def test_deterministic_with_a_seed_and_valid_for_any_seed():
    workers, adapters = _fleet(120, 12, seed=5)
    params = PlacementParams(time_limit_s=0.5, deterministic=True, seed=11)
    one, two = solve(workers, adapters, params=params), solve(workers, adapters, params=params)
    assert one.assignment == two.assignment and one.objective == two.objective
    for seed in (1, 2):
        other = solve(workers, adapters, params=PlacementParams(time_limit_s=0.5, seed=seed))
        check_valid(other, workers, adapters)
        assert other.gap <= 0.10


def test_medium_fleet_is_near_the_bound_and_beats_least_adapters():
    from lorafleet.operator.placement import greedy
    from lorafleet.operator.placement.evaluate import worker_loads
    from lorafleet.operator.placement.problem import build_problem

    workers, adapters = _fleet(200, 16, seed=9)
    params = PlacementParams(time_limit_s=1.0, seed=3, deterministic=True)  # the same search on any machine load
    res = solve(workers, adapters, params=params)
    check_valid(res, workers, adapters)
    assert res.gap <= 0.10 and res.bound <= res.objective
    p = build_problem(workers, adapters, None, params)
    loads = worker_loads(p, greedy.least_adapters(p))
    assert res.max_over_mean < loads.max() / loads.mean()


def test_after_a_shift_moves_far_fewer_bytes_than_a_fresh_solve_and_is_stable():
    workers, adapters = _fleet(150, 12, seed=13)
    params = PlacementParams(time_limit_s=1.0, deterministic=True, seed=1)
    first = solve(workers, adapters, params=params)
    current = {k: set(v) for k, v in first.assignment.items()}
    # Popularity change: the 8 hottest adapters swap rates with 8 cold ones.
    rates = [a.rate for a in adapters]
    for hot, cold in zip(range(8), range(100, 108), strict=True):
        rates[hot], rates[cold] = rates[cold], rates[hot]
    shifted = [Adapter(**{**a.__dict__, "rate": rates[i]}) for i, a in enumerate(adapters)]
    moved = solve(workers, shifted, current, params)
    fresh = solve(workers, shifted, None, params)
    check_valid(moved, workers, shifted)
    assert not moved.kept_current and moved.moved_bytes > 0
    fresh_moves = sum(a.size_bytes * len(set(fresh.assignment[a.name]) - current[a.name]) for a in shifted)
    assert moved.moved_bytes * 3 < fresh_moves
    assert moved.objective <= fresh.objective * (1 + params.hysteresis)
    # Solving again from the result keeps it: no ping-pong between rebalances.
    again = solve(workers, shifted, {k: set(v) for k, v in moved.assignment.items()}, params)
    assert again.kept_current and again.moved_bytes == 0


def test_time_limit_covers_the_whole_solve_at_1000x64():
    """Build, greedy, candidates and every phase share one limit (wall seconds per solve live in bench/placement.py):
    a limit the preparation already used up answers with the greedy hint and never starts CP-SAT."""
    workers, adapters = _fleet(1000, 64, seed=21)
    res = solve(workers, adapters, params=PlacementParams(time_limit_s=0.5, seed=1, deterministic=True))
    check_valid(res, workers, adapters)
    assert res.gap <= 0.10 and res.status in (PlacementStatus.OPTIMAL, PlacementStatus.FEASIBLE)
    assert set(res.timings) >= {"problem", "greedy", "candidates", "model", "balance"}
    spent = solve(workers, adapters, params=PlacementParams(time_limit_s=0.0, seed=1))
    check_valid(spent, workers, adapters)
    assert spent.status == PlacementStatus.GREEDY_FALLBACK and "balance" not in spent.timings


def test_least_adapters_baseline_counts_adapters_not_load():
    from lorafleet.operator.placement import greedy
    from lorafleet.operator.placement.problem import build_problem

    workers = [w("w0"), w("w1")]
    adapters = [ad("hot", 100), ad("c1", 1), ad("c2", 1), ad("c3", 1)]
    p = build_problem(workers, adapters, None, PlacementParams())
    # AIBrix-like: alternate by adapter count -> hot + c2 on w0, c1 + c3 on w1 (load 101 vs 2).
    assert greedy.least_adapters(p) == [[0], [1], [0], [1]]
    # LPT: hot alone, the three cold ones together.
    assert greedy.balanced(p) == [[0], [1], [1], [1]]
