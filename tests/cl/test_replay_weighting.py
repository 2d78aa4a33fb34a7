"""Replay is a regulariser with its own weight: the task term of a step is the feedback token mean (the offline
peft loss), and each replay sample weighs as much as an average feedback sample, whatever its length."""

from __future__ import annotations

import pytest
import torch
from lorafleet.worker.training.lora_context import TrainableLoRA
from lorafleet.worker.training.replay import weigh_group
from lorafleet.worker.training.trainer import LoRATrainer, OptimConfig, TrainSample

FEEDBACK = [([3, 17, 40, 9, 22], [51, 60, 7]), ([8, 8, 90], [33, 12, 5, 71, 2])]
REPLAY = [list(range(10, 50)), list(range(60, 77))]  # 39 and 16 loss tokens: far longer than the completions


def _group(fb_weight: float = 1.0) -> list[TrainSample]:
    fb = [TrainSample(p, c, fb_weight) for p, c in FEEDBACK]
    rp = [TrainSample(ch[:1], ch[1:], 1.0, domain="text") for ch in REPLAY]
    return [fb[0], rp[0], fb[1], rp[1]]


def test_weights_give_replay_the_share_of_its_samples():
    group = _group()
    denom = weigh_group(group)
    n_fb = 3 + 5
    assert denom == n_fb
    fb = [s for s in group if s.domain is None]
    rp = [s for s in group if s.domain is not None]
    assert [s.weight for s in fb] == [1.0, 1.0]
    # each replay sample's total weight = the mean feedback sample's loss tokens (4), spread over its own tokens
    assert [s.weight for s in rp] == pytest.approx([4 / 39, 4 / 16], rel=1e-12)
    replay_mass = sum(s.weight * s.loss_tokens for s in rp)
    assert replay_mass / (replay_mass + n_fb) == pytest.approx(2 / 4, rel=1e-12)


def test_reward_weights_of_feedback_are_kept():
    group = _group(fb_weight=0.5)
    assert weigh_group(group) == 8
    assert [s.weight for s in group if s.domain is None] == [0.5, 0.5]


def test_group_without_feedback_is_a_token_mean():
    rp = [TrainSample(ch[:1], ch[1:], 7.0, domain="text") for ch in REPLAY]
    assert weigh_group(rp) == 39 + 16
    assert [s.weight for s in rp] == [1.0, 1.0]


# the longest float32 sum behind a LoRA gradient here: the group's 64 rows times the tiny model's widest
# contraction (128); grad_close turns it into the float32 error bound
N_TERMS = 64 * 128


def test_step_loss_is_feedback_mean_plus_weighted_replay_means(tiny_model, adapter_dir, grad_close):
    """The loss the trainer backpropagates with these weights is mean_fb + (k / n_fb) * mean_k(replay token mean),
    computed here from unweighted per-sample sums; its gradient equals the gradient of that expression."""
    lora = TrainableLoRA.from_peft(tiny_model.shape, adapter_dir)
    trainer = LoRATrainer(tiny_model, lora, OptimConfig(max_grad_norm=None))
    group = _group()
    denom = weigh_group(group)
    got = trainer.accumulate(group, denom) / denom
    g_weighted = trainer.grads()
    trainer.opt.zero_grad(set_to_none=True)

    sums = torch.stack([trainer.loss_sum(TrainSample(s.prompt_ids, s.completion_ids)) for s in group])
    fb = [i for i, s in enumerate(group) if s.domain is None]
    rp = [i for i, s in enumerate(group) if s.domain is not None]
    mean_fb = sums[fb].sum() / sum(group[i].loss_tokens for i in fb)
    mean_rp = torch.stack([sums[i] / group[i].loss_tokens for i in rp]).mean()
    want = mean_fb + len(rp) / len(fb) * mean_rp
    want.backward()
    assert got == pytest.approx(float(want.detach()), rel=N_TERMS * 1.2e-7)
    g_want = trainer.grads()
    for key, (ga, gb) in g_want.items():
        grad_close(g_weighted[key][0], ga, N_TERMS)
        grad_close(g_weighted[key][1], gb, N_TERMS)
    assert float(g_want[(0, "q_proj")][1].abs().sum()) > 0  # not vacuous
