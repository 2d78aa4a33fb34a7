"""The move diff: every adapter keeps a serving replica at every step, the final state is the new placement, and
with worker capacities a full worker is drained before anything lands on it."""

from __future__ import annotations

import random

from lorafleet.operator.placement import Move, Worker, diff


def apply(current: dict[str, set[str]], moves: list[Move], keep_serving: set[str]) -> dict[str, set[str]]:
    """Execute moves step by step (add, then remove), asserting the serving invariant after every single step."""
    state = {k: set(v) for k, v in current.items()}
    for m in moves:
        if m.add is not None:
            assert m.add not in state.setdefault(m.adapter, set()), f"{m} loads a replica that is already there"
            state[m.adapter].add(m.add)
        if m.remove is not None:
            assert m.remove in state.get(m.adapter, set()), f"{m} unloads a replica that is not there"
            state[m.adapter].discard(m.remove)
        for name in keep_serving:
            assert state.get(name), f"{name} has no replica after {m}"
    return {k: v for k, v in state.items() if v}


def test_single_move_is_one_add_then_remove_step():
    assert diff({"a": {"w0"}}, {"a": ["w1"]}) == [Move("a", "w1", "w0")]


def test_no_change_no_moves_and_deleted_adapter_is_removed():
    assert diff({"a": {"w0", "w1"}}, {"a": ["w1", "w0"]}) == []
    assert diff({"gone": {"w0"}}, {}) == [Move("gone", None, "w0")]
    assert diff({}, {"new": ["w3"]}) == [Move("new", "w3", None)]


def test_scale_down_while_moving_keeps_a_replica():
    current = {"a": {"w0", "w1", "w2"}}
    moves = diff(current, {"a": ["w9"]})
    assert apply(current, moves, {"a"}) == {"a": {"w9"}}
    assert moves[-1] in (Move("a", "w9", "w0"), Move("a", "w9", "w1"), Move("a", "w9", "w2"))


def test_random_diffs_keep_every_surviving_adapter_served():
    rng = random.Random(4)
    workers = [f"w{i}" for i in range(8)]
    for _ in range(200):
        current = {f"a{i}": set(rng.sample(workers, rng.randint(1, 4))) for i in range(12)}
        new = {f"a{i}": rng.sample(workers, rng.randint(1, 4)) for i in range(12) if rng.random() < 0.9}
        new |= {"fresh": rng.sample(workers, 2)}
        moves = diff(current, new)
        survivors = set(current) & set(new)
        assert apply(current, moves, survivors) == {k: set(v) for k, v in new.items()}


def test_capacity_order_drains_a_full_worker_first():
    # w1 is full with b; a moves w0 -> w1 and b moves w1 -> w2. Name order would try a first and overfill w1.
    workers = [Worker("w0", "n", 1 << 30, 1, 64), Worker("w1", "n", 1 << 30, 1, 64), Worker("w2", "n", 1 << 30, 1, 64)]
    current = {"a": {"w0"}, "b": {"w1"}}
    new = {"a": ["w1"], "b": ["w2"]}
    assert diff(current, new) == [Move("a", "w1", "w0"), Move("b", "w2", "w1")]
    assert diff(current, new, workers) == [Move("b", "w2", "w1"), Move("a", "w1", "w0")]


def test_capacity_order_frees_slots_by_removals_first_and_respects_memory():
    workers = [Worker("w0", "n", 100, 4, 64), Worker("w1", "n", 100, 4, 64)]
    sizes = {"big": 80, "old": 50, "x": 10}
    current = {"old": {"w1"}, "x": {"w0"}, "big": {"w0"}}
    new = {"big": ["w1"], "x": ["w0"]}  # old is deleted: its 50 bytes must go before big (80) fits on w1
    moves = diff(current, new, workers, sizes)
    assert moves == [Move("old", None, "w1"), Move("big", "w1", "w0")]


def test_blocked_swap_still_returns_every_move():
    workers = [Worker("w0", "n", 1 << 30, 1, 64), Worker("w1", "n", 1 << 30, 1, 64)]
    current = {"a": {"w0"}, "b": {"w1"}}
    moves = diff(current, {"a": ["w1"], "b": ["w0"]}, workers)
    assert sorted(moves, key=lambda m: m.adapter) == [Move("a", "w1", "w0"), Move("b", "w0", "w1")]
