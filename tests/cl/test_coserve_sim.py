"""Co-serving control on a simulated clock: the latency target, the min share, pieces larger than a budget."""

from __future__ import annotations

from lorafleet.worker.training.coserve import OverlapController, ShareConfig
from lorafleet.worker.training.slo import GuardConfig

# these simulations test the iteration-level loop, with no finished requests to steer by: its aim stays fixed here
FIXED_AIM = GuardConfig(start=0.95)


def test_overlap_controller_fills_the_gap_and_never_starves():
    """Asynchronous pieces on a simulated GPU: a serving iteration is 10 ms of which the GPU is busy 3 ms, the
    target is 12 ms. Training that fits the 7 ms gap is free; beyond it, it delays the next iteration (contention).
    The controller's GPU budget settles near the gap with the iteration time under the target; when every piece
    slows serving past the target it backs off to the min share (a share of the time)."""
    target, piece = 0.012, 0.001  # 1 ms pieces (layer-split graphs)

    def run(c, gap, iters, piece_s=piece):
        its, gpu = [], []
        for _ in range(iters):
            c.plan(2048, 64, True)
            launched = 0
            while launched < 64 and c.may_launch(piece_s):
                c.spend(piece_s)
                launched += 1
            work = launched * piece_s
            it = 0.010 + max(0.0, work - gap)
            its.append(it)
            gpu.append(work)
            c.observe(2048, 64, 100 * launched, it, 0.0, True, it)
        return its, gpu

    c = OverlapController(ShareConfig(tpot_target_s=target, min_share=0.1, guard=FIXED_AIM))
    its, gpu = run(c, gap=0.007, iters=600)
    tail_it, tail_gpu = its[-300:], gpu[-300:]
    assert sum(tail_it) / 300 <= target * 0.95 + 1e-9  # the target holds on average
    assert sum(tail_gpu) / 300 >= 0.006  # and training uses most of the 7 ms gap (alone it would use 10 ms)
    # no gap at all: every piece costs serving its full time -> only as many as the target's slack pays for
    c2 = OverlapController(ShareConfig(tpot_target_s=target, min_share=0.1, guard=FIXED_AIM))
    its2, gpu2 = run(c2, gap=0.0, iters=600, piece_s=0.004)
    assert sum(its2[-300:]) / 300 <= target * 0.96
    assert sum(1 for g in gpu2[-300:] if g > 0) >= 300 * 0.1 * 0.7  # never under the min share
    # pieces so costly that even one misses the target: the min share alone, a share of time (pieces of 30 ms
    # take ~10% of the iteration time, not one piece per 1/min_share iterations)
    c4 = OverlapController(ShareConfig(tpot_target_s=target, min_share=0.1, guard=FIXED_AIM))
    its4, gpu4 = run(c4, gap=0.0, iters=600, piece_s=0.030)
    assert 0.1 * 0.7 <= sum(gpu4[-300:]) / sum(its4[-300:]) <= 0.1 * 1.3
    # a piece longer than an iteration's budget still runs (credit is never capped below the largest piece)
    c3 = OverlapController(ShareConfig(tpot_target_s=target, min_share=0.0, guard=FIXED_AIM))
    _, gpu3 = run(c3, gap=0.007, iters=400, piece_s=0.016)
    assert sum(1 for g in gpu3 if g > 0) >= 20
    # nothing decoding: the whole leftover, no credit needed
    assert c.plan(2048, 0, False) == 2048 and c.may_launch(1.0)


def test_min_share_runs_a_first_piece_larger_than_any_credit_when_inference_alone_misses_the_target():
    """Inference alone is over the aim from the start, so the GPU budget only shrinks and the credit never covers
    a 30 ms piece: the min share's credit must still grow to the piece the job is waiting to launch (it has run
    none yet, so no largest piece is known) and pay for it."""
    c = OverlapController(ShareConfig(tpot_target_s=0.012, min_share=0.1, guard=FIXED_AIM))
    busy, total = 0.0, 0.0
    for _ in range(900):
        c.plan(2048, 64, True)
        work = 0.0
        if c.may_launch(0.030):
            c.spend(0.030)
            work = 0.030
        it = 0.0118 + work
        c.observe(2048, 64, 640 if work else 0, it, 0.0, True, it)
        busy, total = busy + work, total + it
    assert 0.1 * 0.7 <= busy / total <= 0.1 * 1.3
