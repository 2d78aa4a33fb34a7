"""The outer latency loop (training/slo.py): it moves the co-serving controllers' aim by the TPOT percentile that
finished requests actually got, so the target holds where the iteration-level loop is biased, and slack the
iteration-level loop leaves unused is trained on."""

from __future__ import annotations

import random

import pytest
from lorafleet.worker.engine.request_log import RequestTpotLog
from lorafleet.worker.training.coserve import OverlapController, ShareConfig
from lorafleet.worker.training.slo import GuardConfig, TpotGuard, quantile


def test_quantile_is_nearest_rank():
    xs = [float(i) for i in range(1, 101)]
    assert quantile(xs, 0.99) == 99.0 and quantile(xs, 0.5) == 50.0 and quantile([3.0, 1.0], 0.99) == 3.0


def test_guard_moves_the_aim_by_the_percentile_and_only_on_fresh_requests():
    g = TpotGuard(GuardConfig(min_samples=4, max_step=0.08, margin=0.97, start=0.95))
    g.observe([(1.0, 0.014)] * 3, 0.010, now=2.0)
    assert g.aim == 0.95 and g.decisions == 0  # fewer than min_samples: no decision
    g.observe([(1.0, 0.014)], 0.010, now=2.0)  # p99 at 1.4x the target: tighten, by at most max_step
    assert g.aim == pytest.approx(0.95 * 0.92) and g.last_quantile == pytest.approx(1.4)
    tightened = g.aim
    # requests whose decode mostly ran before the change say nothing about the new aim
    g.observe([(1.5, 0.014)] * 10, 0.010, now=3.0)
    assert g.aim == tightened and g.decisions == 1
    g.observe([(2.5, 0.0085)] * 4, 0.010, now=3.0)  # fresh, at 0.85x: loosen, proportionally
    assert g.aim == pytest.approx(tightened * (0.97 / 0.85) ** 0.5)
    loosened = g.aim
    g.observe([(4.0, 0.0095)] * 4, 0.010, now=5.0)  # within [margin - band, margin]: no change
    assert g.aim == loosened and g.decisions == 3
    for k in range(60):  # bounded
        g.observe([(10.0 + k, 0.002)] * 4, 0.010, now=10.0 + k)
    assert g.aim == g.cfg.aim_max
    g.restore({"aim": 9.0})
    assert g.aim == g.cfg.aim_max and g.state() == {"aim": g.cfg.aim_max}


def test_request_log_gives_each_reader_every_sample_once():
    log = RequestTpotLog(size=4)
    log.add(0.0, 1.0, 1)  # one token: no TPOT
    log.add(0.0, 1.0, 11)
    assert log.since(0) == ([(0.5, 0.1)], 1)
    for k in range(6):
        log.add(float(k), float(k) + 2.0, 3)
    got, cur = log.since(1)  # a reader that lagged by more than the ring: the newest `size` samples
    assert cur == 7 and [m for m, _ in got] == [3.0, 4.0, 5.0, 6.0]
    assert log.since(7) == ([], 7) and log.since(5)[0] == [(5.0, 1.0), (6.0, 1.0)]


def _simulate(kind: str, guard: bool, target: float, iters: int = 4000, life: int = 16, seed: int = 0):
    """Requests of `life` decode iterations start every iteration; a request's TPOT is the mean of its iterations
    (on the simulated clock), reported to the guard when it ends. Returns (p99 TPOT / target over the second
    half, training GPU seconds per iteration over the second half)."""
    rng = random.Random(seed)
    cfg = GuardConfig() if guard else GuardConfig(min_samples=10**9, start=0.95)  # without: a fixed aim
    c = OverlapController(ShareConfig(tpot_target_s=target, min_share=0.05, guard=cfg))
    ends, tpots, trained = [0.0], [], []
    for i in range(iters):
        c.plan(2048, 64, True)
        if kind == "biased":
            # fused rides of 4 ms on a ~9.5 ms step, and an iteration signal that misses 10% of what requests see
            # (e.g. host time outside the measured interval)
            rode = c.may_ride()
            it = 0.0095 + rng.uniform(-0.001, 0.001) + (0.004 if rode else 0.0)
            c.observe(2048, 64, 0, 0.9 * it, 0.0, True, 0.9 * it, 128 if rode else 0)
            trained.append(0.004 if rode else 0.0)
        else:
            # 1 ms pieces into a 3 ms host gap, and a long prefill iteration every 4th step: the short-window mean
            # of iteration times jumps over the aim at every spike, though requests average the spikes out
            launched = 0
            while launched < 64 and c.may_launch(0.001):
                c.spend(0.001)
                launched += 1
            spike = 0.012 if i % 4 == 0 else 0.0
            it = 0.008 + spike + max(0.0, 0.001 * launched - 0.003) + rng.uniform(0, 0.0005)
            c.observe(2048, 64, 100 * launched, it, 0.0, True, it)
            trained.append(0.001 * launched)
        ends.append(ends[-1] + it)
        if i >= life:
            start, end = ends[i - life + 1], ends[i + 1]
            tpots.append((end - start) / life)
            c.guard.observe([(0.5 * (start + end), tpots[-1])], target, now=end)
    tail = sorted(tpots[len(tpots) // 2 :])
    return quantile(tail, 0.99) / target, sum(trained[iters // 2 :]) / (iters // 2), c.guard.aim


def test_guard_keeps_the_target_when_the_iteration_signal_is_biased():
    p99_without, _, _ = _simulate("biased", guard=False, target=0.012)
    p99_with, trained, aim = _simulate("biased", guard=True, target=0.012)
    assert p99_without > 1.02  # the iteration-level loop alone misses the target
    assert p99_with <= 1.0 and aim < GuardConfig().start  # the guard tightened the aim until it held
    assert trained > 0.0


@pytest.mark.parametrize("target", [0.016, 0.018])
def test_guard_trains_on_the_slack_spiky_iterations_hide(target):
    p99_without, trained_without, _ = _simulate("spiky", guard=False, target=target)
    p99_with, trained_with, aim = _simulate("spiky", guard=True, target=target)
    assert p99_without < 0.9  # slack left unused by the iteration-level loop
    assert p99_with <= 1.0 and aim > 1.0
    assert trained_with >= 1.1 * trained_without


def test_retarget_starts_target_relative_state_over():
    """A GPU budget learned against a looser target (or the 50 ms default) must not burst a tighter one."""
    from lorafleet.worker.training.coserve import CoServeScheduler

    c = OverlapController(ShareConfig(tpot_target_s=0.05))
    c.credit, c.ema, c.guard.aim = 0.02, 0.04, 1.3
    c.retarget(0.009)
    assert (c.cfg.tpot_target_s, c.gpu_budget, c.credit, c.ema) == (0.009, pytest.approx(0.0009), 0.0, None)
    assert c.guard.aim == c.cfg.guard.start and c.guard.cursor is None
    s = CoServeScheduler(ShareConfig(tpot_target_s=0.05))
    s.credit = 0.3
    s.cost.add(100, 0.01)
    s.retarget(0.009)
    assert (s.cfg.tpot_target_s, s.credit, len(s.cost._pts)) == (0.009, 0.0, 1)
