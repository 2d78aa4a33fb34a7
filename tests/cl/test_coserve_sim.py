"""Co-serving on a simulated clock: the budget invariant, the latency target, the min share, adaptivity."""

from __future__ import annotations

import random

from lorafleet.worker.training.coserve import CoServeScheduler, ShareConfig

BUDGET = 2048
C0, C1 = 0.010, 20e-6  # iteration seconds = C0 + C1 * tokens (a decode-heavy small-model GPU shape)
PIECE_OVERHEAD = 0.004  # fixed launch cost of an eager training piece
DECODE_LEN = 64


def _simulate(load_decodes: int, target: float, iters: int = 3000, seed: int = 0, min_share: float = 0.05):
    rng = random.Random(seed)
    sch = CoServeScheduler(ShareConfig(tpot_target_s=target, min_share=min_share))
    tpots, ft_total, shares, iter_times = [], 0, [], []
    for _ in range(iters):
        decodes = max(0, int(rng.gauss(load_decodes, load_decodes * 0.1)))
        prefill = rng.choice([0, 0, 0, 128, 256]) if load_decodes else 0
        inf = min(BUDGET, decodes + prefill)
        ft = sch.plan(BUDGET, inf, decoding=decodes > 0)
        assert 0 <= ft <= BUDGET - inf  # the hard invariant
        inf_s = C0 + C1 * inf + rng.uniform(0, 0.0005)
        ft_s = (PIECE_OVERHEAD + C1 * ft) if ft else 0.0
        sch.observe(BUDGET, inf, ft, inf_s, ft_s, decoding=decodes > 0)
        secs = inf_s + ft_s
        if decodes:
            iter_times.append(secs)
            if len(iter_times) >= DECODE_LEN:  # a request's TPOT = mean of its DECODE_LEN iterations
                tpots.append(sum(iter_times[-DECODE_LEN:]) / DECODE_LEN)
        ft_total += ft
        shares.append(sch.share)
    return sorted(tpots), ft_total, shares, sch


def _p99(xs):
    return xs[int(0.99 * (len(xs) - 1))]


def test_budget_and_latency_target_respected():
    target = 0.035  # inference alone at 256 decodes: 0.015 s, so there is headroom for ~1000 fine-tuning tokens
    tpots, ft_total, shares, _ = _simulate(256, target)
    steady = tpots[300:] if len(tpots) > 300 else tpots
    assert _p99(sorted(steady)) <= target * 1.02
    assert ft_total / 3000 > 500  # fine-tuning really used the leftover
    assert min(shares[300:]) > 0.05


def test_share_adapts_to_load_and_never_starves():
    _, light, _, _ = _simulate(32, 0.035)
    _, heavy, _, s_heavy = _simulate(1200, 0.035)
    assert light > 2 * heavy
    # at a target inference alone cannot meet, fine-tuning shrinks to its minimum share of time, never to zero,
    # and slows decodes by about that share only
    tp, starved, shares, _ = _simulate(1900, 0.020, iters=2000)
    alone = C0 + C1 * 1900
    assert starved > 0
    assert _p99(tp) <= alone * (1 + 0.05) + 0.0015
    assert s_heavy.share < 1.0


def test_idle_inference_gives_everything_to_finetuning():
    sch = CoServeScheduler(ShareConfig(tpot_target_s=0.02))
    assert sch.plan(BUDGET, 0, decoding=False) == BUDGET
    assert sch.plan(BUDGET, BUDGET, decoding=True) == 0
