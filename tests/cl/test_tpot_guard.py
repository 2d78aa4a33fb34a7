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
            # 4 ms training pieces after a ~9.5 ms step, and an iteration signal that misses 10% of what requests
            # see (e.g. host time outside the measured interval)
            rode = c.may_launch(0.004)
            if rode:
                c.spend(0.004)
            it = 0.0095 + rng.uniform(-0.001, 0.001) + (0.004 if rode else 0.0)
            c.observe(2048, 64, 100 if rode else 0, 0.9 * it, 0.0, True, 0.9 * it)
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
    c = OverlapController(ShareConfig(tpot_target_s=0.05))
    c.credit, c.ema, c.guard.aim = 0.02, 0.04, 1.3
    c.retarget(0.009)
    assert (c.cfg.tpot_target_s, c.gpu_budget, c.credit, c.ema) == (0.009, pytest.approx(0.0009), 0.0, None)
    assert c.guard.aim == c.cfg.guard.start and c.guard.cursor is None


def _queueing(
    pause: str, target: float | None = None, every: int = 16, iters: int = 6000, seed: int = 1
) -> tuple[float, float, float, int]:
    """Poisson arrivals into continuous batching whose step costs A + B per running sequence (the shape measured on
    the H200, `bench/cl_timeslice_check.py`): a pause lets the batch grow, and every later step is slower until the
    backlog clears. pause: none | fixed (one PIECE every `every` steps) | guard (the overlap controller and its
    guard against `target`). Returns (TPOT p50, TPOT p99 over the second half, share of time paused, running
    sequences at the end)."""
    a, b, life, rate, piece = 0.004, 40e-6, 64, 260.0, 0.002
    arrivals, noise = random.Random(seed), random.Random(seed + 1000)  # the same arrivals whatever the pauses
    c = OverlapController(ShareConfig(tpot_target_s=target or 1.0, min_share=0.01, guard=GuardConfig()))
    t, next_arrival, paused = 0.0, 0.0, 0.0
    running: list[list[float]] = []  # [first token time, tokens so far]
    tpots: list[tuple[float, float]] = []  # (end time, TPOT)
    for i in range(iters):
        while next_arrival <= t:
            running.append([-1.0, 0.0])
            next_arrival += arrivals.expovariate(rate)
        n = len(running)
        c.plan(2048, n, True)
        gap = 0.0
        if pause == "fixed" and i % every == 0:
            gap = piece
        elif pause == "guard":
            while c.may_launch(piece):
                c.spend(piece)
                gap += piece
        it = a + b * n + noise.uniform(0, 0.0003) + gap
        t += it
        paused += gap
        c.observe(2048, n, int(gap * 1e5), it, 0.0, True, it)
        done = []
        for r in running:
            if r[0] < 0:
                r[0] = t
            r[1] += 1
            if r[1] == life:
                done.append(r)
                tpots.append((t, (t - r[0]) / (life - 1)))
        for r in done:
            running.remove(r)
        if pause == "guard" and done:
            c.guard.observe([(end - 0.5 * tp * (life - 1), tp) for end, tp in tpots[-len(done) :]], target, t)
    tail = sorted(tp for end, tp in tpots if end > t / 2)
    return quantile(tail, 0.5), quantile(tail, 0.99), paused / t, len(running)


def test_a_pause_costs_serving_more_than_its_length_by_littles_law():
    """Why co-serving's latency slack buys fewer training seconds than its size (the H200's time-slicing runs):
    while serving pauses, requests keep arriving and none finishes, so the batch grows and every later step costs
    more; TPOT rises by about the pause share / (1 - rate x length x B), here ~3.5x it. Co-serving still holds the
    target, because its controllers steer by the iteration time and the TPOT that carry the growth, and it trains
    on correspondingly less than the 10% slack."""
    p50_alone, p99_alone, _, _ = _queueing("none")
    p50_paused, _, share, backlog = _queueing("fixed", every=4)
    assert 0.03 < share < 0.05 and backlog < 400  # paused ~4% of the time; the queue stays stable
    assert p50_paused / p50_alone - 1 > 2.5 * share  # amplified: TPOT rose by far more than the pause share
    target = 1.10 * p99_alone
    _, p99_guarded, trained, _ = _queueing("guard", target=target)
    assert p99_guarded <= 1.01 * target
    assert 0.02 <= trained < 0.10 / 1.4
