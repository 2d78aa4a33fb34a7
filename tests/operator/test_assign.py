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
