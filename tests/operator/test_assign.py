"""The fast-path assignment: hand-checkable cases."""

from __future__ import annotations

from lorafleet.operator.assign import WorkerSlot, desired_replicas, plan


def test_new_adapter_goes_to_least_loaded_and_spreads_nodes() -> None:
    workers = [WorkerSlot("w0", "n0", load=5.0), WorkerSlot("w1", "n0", load=0.0), WorkerSlot("w2", "n1", load=1.0)]
    p = plan({}, {"a": 2}, workers)
    # least loaded first (w1 on n0), then the other node (w2) even though w0 is also free
    assert p.adds == [("a", "w1"), ("a", "w2")] and p.removes == []


def test_healthy_placements_never_move_and_surplus_leaves_busiest() -> None:
    workers = [WorkerSlot("w0", "n0", load=9.0), WorkerSlot("w1", "n1", load=1.0)]
    p = plan({"a": {"w0", "w1"}, "b": {"w0"}}, {"a": 1, "b": 1}, workers)
    assert p.adds == [] and p.removes == [("a", "w0")]


def test_capacity_rank_and_blocked_and_unplaceable() -> None:
    workers = [WorkerSlot("w0", "n0", capacity=1), WorkerSlot("w1", "n1", capacity=5, max_rank=8)]
    p = plan({"x": {"w0"}}, {"x": 1, "big": 1, "small": 1}, workers, ranks={"big": 16, "small": 4})
    assert ("small", "w1") in p.adds and p.unplaceable == {"big": 1}
    p2 = plan({}, {"small": 1}, workers, ranks={"small": 4}, blocked={"small": {"w0", "w1"}})
    assert p2.adds == [] and p2.unplaceable == {"small": 1}


def test_lost_worker_replicas_are_replaced() -> None:
    # w0 vanished: current only lists usable workers, so "a" is missing one replica and goes to w2
    workers = [WorkerSlot("w1", "n1"), WorkerSlot("w2", "n2")]
    p = plan({"a": {"w1"}}, {"a": 2}, workers)
    assert p.adds == [("a", "w2")]


def test_priority_wins_scarce_slots() -> None:
    workers = [WorkerSlot("w0", "n0", capacity=1)]
    p = plan({}, {"low": 1, "high": 1}, workers, priority={"high": 10})
    assert p.adds == [("high", "w0")] and p.unplaceable == {"low": 1}


def test_desired_replicas_fixed_and_auto() -> None:
    assert desired_replicas({"replicas": {"min": 2, "max": 4}}, 0.0, 3) == (2, 2)
    assert desired_replicas({"replicas": {"min": 5}}, 0.0, 3) == (3, 5)  # capped by workers, asked kept
    assert desired_replicas({}, 0.0, 3) == (1, 1)
    auto = {"replicas": {"min": 1, "max": 3, "auto": True}}
    assert desired_replicas(auto, 0.0, 4, per_replica_rate=4.0) == (1, 1)
    assert desired_replicas(auto, 9.0, 4, per_replica_rate=4.0) == (3, 3)
    assert desired_replicas(auto, 100.0, 4, per_replica_rate=4.0) == (3, 3)


def test_trickle_load_does_not_outweigh_adapter_count() -> None:
    workers = [WorkerSlot("w0", "n0", load=0.02), WorkerSlot("w1", "n1", load=0.0)]
    p = plan({"a": {"w1"}, "b": {"w1"}, "c": {"w1"}}, {"a": 1, "b": 1, "c": 1, "d": 1}, workers)
    assert p.adds == [("d", "w0")]


KIB = 1024


def test_memory_budget_bounds_the_fast_path() -> None:
    """w0 is idle but its 10 KiB budget already holds 6 KiB: a 5 KiB adapter goes to the busier w1, a 4 KiB one
    still fits on w0 (exactly full), and one larger than every budget is unplaceable, not forced anywhere."""
    workers = [
        WorkerSlot("w0", "n0", load=0.0, memory_bytes=10 * KIB),
        WorkerSlot("w1", "n1", load=5.0, memory_bytes=10 * KIB),
    ]
    sizes = {"held": 6 * KIB, "five": 5 * KIB, "four": 4 * KIB, "huge": 11 * KIB}
    p = plan({"held": {"w0"}}, {"held": 1, "five": 1}, workers, sizes=sizes)
    assert p.adds == [("five", "w1")] and p.unplaceable == {}
    # without sizes (the old count-only rule) the idle w0 would have taken it
    assert plan({"held": {"w0"}}, {"held": 1, "five": 1}, workers).adds == [("five", "w0")]
    p = plan({"held": {"w0"}}, {"held": 1, "four": 1}, workers, sizes=sizes)
    assert p.adds == [("four", "w0")]
    p = plan({}, {"huge": 1}, workers, sizes=sizes)
    assert p.adds == [] and p.unplaceable == {"huge": 1}


def test_memory_is_counted_across_adds_and_freed_by_removes() -> None:
    """Two replicas of a 6 KiB adapter cannot share one 10 KiB worker with another 6 KiB one: every add is charged
    at once, and a surplus replica removed earlier in the same plan frees its bytes for a later add."""
    workers = [WorkerSlot("w0", "n0", memory_bytes=10 * KIB), WorkerSlot("w1", "n1", memory_bytes=10 * KIB)]
    sizes = {"a": 6 * KIB, "b": 6 * KIB}
    p = plan({}, {"a": 2, "b": 1}, workers, sizes=sizes, priority={"a": 1})
    assert sorted(p.adds) == [("a", "w0"), ("a", "w1")] and p.unplaceable == {"b": 1}
    # "a" shrinks 2 -> 1 (it leaves the busier w0) and, in the same plan, "b" takes the freed bytes
    busy = [WorkerSlot("w0", "n0", load=3.0, memory_bytes=10 * KIB), WorkerSlot("w1", "n1", memory_bytes=10 * KIB)]
    p = plan({"a": {"w0", "w1"}}, {"a": 1, "b": 1}, busy, sizes=sizes, priority={"a": 1})
    assert p.removes == [("a", "w0")] and p.adds == [("b", "w0")]


def test_fast_path_fits_exactly_what_the_solver_calls_eligible() -> None:
    """One capacity model: the fast path's fit test and the CP-SAT problem's eligibility agree byte for byte,
    including the solver's whole-KiB rounding (sizes up, budgets down)."""
    from lorafleet.operator.capacity import Capacity, size_kib, worker_capacity
    from lorafleet.operator.placement import Adapter, PlacementParams, Worker
    from lorafleet.operator.placement.problem import build_problem

    budgets = [KIB - 1, KIB, 4 * KIB, 4 * KIB + 1023, 5 * KIB - 1, 5 * KIB]
    sizes = [1, KIB - 1, KIB, KIB + 1, 4 * KIB, 4 * KIB + 1, 5 * KIB - 1, 5 * KIB]
    workers = [Worker(f"w{i}", f"n{i}", memory_bytes=b, slots=4, max_rank=64) for i, b in enumerate(budgets)]
    adapters = [Adapter(f"a{j}", size_bytes=s, rank=8) for j, s in enumerate(sizes)]
    problem = build_problem(workers, adapters, {}, PlacementParams())
    for i, b in enumerate(budgets):
        cap = worker_capacity({"maxAdapters": 4, "adapterMemoryBytes": b})
        assert cap == Capacity(slots=4, memory_bytes=b)
        for j, s in enumerate(sizes):
            assert cap.fits([], s) == bool(problem.eligible[j, i]), (b, s)
    assert size_kib(KIB + 1) == 2 and size_kib(1) == 1
    # next to held adapters: 1 KiB + 3 KiB (rounded up from 2 KiB + 1) fill a 4 KiB budget, a fifth KiB does not fit
    cap = Capacity(slots=4, memory_bytes=4 * KIB + 1023)
    assert cap.fits([KIB], 2 * KIB + 1) and not cap.fits([KIB, 2 * KIB + 1], 1)
    assert not Capacity(slots=1).fits([1], 1)  # slots still count
