"""replicas.auto hysteresis on a synthetic rate trace: immediate scale-up, delayed and banded scale-down."""

from __future__ import annotations

from lorafleet.operator.autoscale import AutoScaler

AUTO = {"replicas": {"min": 1, "max": 4, "auto": True}}


def run(scaler: AutoScaler, trace: list[tuple[float, float]], workers: int = 4) -> list[int]:
    return [scaler.decide("a", AUTO, rate, workers, t)[0] for t, rate in trace]


def test_scale_up_is_immediate_and_scale_down_waits_for_the_delay() -> None:
    s = AutoScaler(per_replica_rate=1.0, delay=10.0)
    assert run(s, [(0, 0.0), (1, 2.5)]) == [1, 3]
    # the rate falls to 0.3 at t=2: still 3 replicas until it has stayed low for 10 s, then 1 at once
    trace = [(t, 0.3) for t in (2, 5, 11, 11.9, 12)]
    assert run(s, trace) == [3, 3, 3, 3, 1]
    assert s.held("a") == 1


def test_a_rate_wobbling_around_a_boundary_does_not_flap() -> None:
    """1.9 <-> 2.1 req/s with 1 req/s per replica: plain ceil() flips between 2 and 3 every sample."""
    s = AutoScaler(per_replica_rate=1.0, delay=5.0)
    trace = [(float(t), 2.1 if t % 2 else 1.9) for t in range(1, 60)]
    out = run(s, trace)
    assert out[0] == 3 and set(out) == {3}  # up once on the first 2.1, never back down: 1.9 > 0.8 * 2
    # a real drop below the band (1.5 < 0.8 x 2) removes exactly one replica after the delay, and only then
    later = run(s, [(60.0 + t, 1.5) for t in range(0, 7)])
    assert later == [3, 3, 3, 3, 3, 2, 2]


def test_a_short_dip_resets_the_timer_and_bounds_are_kept() -> None:
    s = AutoScaler(per_replica_rate=1.0, delay=5.0)
    run(s, [(0, 3.5)])
    assert run(s, [(1, 0.2), (4, 0.2), (5, 3.9), (7, 0.2), (11, 0.2), (12, 0.2)]) == [4, 4, 4, 4, 4, 1]
    assert s.decide("a", AUTO, 100.0, 2, 13) == (2, 4)  # capped by the workers there are, asked for max
    fixed = {"replicas": 2}
    assert s.decide("b", fixed, 50.0, 4, 0) == (2, 2) and s.held("b") is None
