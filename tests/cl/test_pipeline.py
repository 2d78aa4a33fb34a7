"""Chunked forward + layer-by-layer backward (FlexLLM) gives the same gradients as one monolithic backward."""

from __future__ import annotations

import pytest
from lorafleet.worker.training.lora_context import TrainableLoRA
from lorafleet.worker.training.pipeline import LayerwiseGroup, LayerwiseSequence
from lorafleet.worker.training.trainer import LoRATrainer, TrainSample

# The longest float32 sum behind a LoRA gradient here: up to 128 tokens times the widest contraction (the tiny
# model's intermediate size, 128); grad_close turns it into the float32 error bound.
N_TERMS = 128 * 128


@pytest.mark.timeout(120)
def test_layerwise_chunked_equals_monolithic(adapter_dir, tiny_model, grad_close):
    lora = TrainableLoRA.from_peft(tiny_model.shape, adapter_dir)
    trainer = LoRATrainer(tiny_model, lora)
    prompt, completion = list(range(5, 25)), list(range(40, 52))
    s = TrainSample(prompt, completion)
    ref_loss = trainer.accumulate([s], 12)
    ref = trainer.grads()
    trainer.opt.zero_grad(set_to_none=True)

    seq = LayerwiseSequence(trainer, s, 12)
    budgets = [7, 7, 7, 7, 3, 100, 1, 100, 100, 100]
    used = []
    for b in budgets:
        u = seq.work(b)
        assert u <= b + 1e-9  # never over the budget it was given
        used.append(u)
        if seq.done:
            break
    assert seq.done
    assert len(seq.bounds) >= 5  # the forward really was chunked
    assert abs(seq.loss_sum - ref_loss) < 1e-4
    got = trainer.grads()
    for key in ref:
        grad_close(got[key][0], ref[key][0], N_TERMS)
        grad_close(got[key][1], ref[key][1], N_TERMS)


@pytest.mark.timeout(120)
def test_layerwise_with_prefix_equals_trainer(adapter_dir, tiny_model, grad_close):
    lora = TrainableLoRA.from_peft(tiny_model.shape, adapter_dir)
    trainer = LoRATrainer(tiny_model, lora)
    prompt, completion = list(range(5, 17)), list(range(60, 70))
    prefix = trainer.prompt_kv(prompt)
    s = TrainSample(prompt, completion, prefix_kv=prefix)
    trainer.accumulate([s], 10)
    ref = trainer.grads()
    trainer.opt.zero_grad(set_to_none=True)
    seq = LayerwiseSequence(trainer, s, 10)
    for _ in range(200):
        if seq.done:
            break
        assert seq.work(max(4.0, seq.max_piece_cost())) > 0  # progress with a budget of the largest piece
    assert seq.done
    got = trainer.grads()
    for key in ref:
        grad_close(got[key][1], ref[key][1], N_TERMS)


@pytest.mark.timeout(120)
def test_group_packed_and_long_samples_equal_trainer(adapter_dir, tiny_model, grad_close):
    """A group mixing packed whole samples, a token-chunked long sample and stash prefixes: same gradients as the
    packed monolithic trainer, and no piece over its budget."""
    lora = TrainableLoRA.from_peft(tiny_model.shape, adapter_dir)
    trainer = LoRATrainer(tiny_model, lora)
    p1 = list(range(5, 17))
    samples = [
        TrainSample([3, 4, 5], [6, 7]),
        TrainSample(list(range(20, 60)), list(range(60, 70)), weight=0.5),  # long: token-chunked at budget 16
        TrainSample(p1, [80, 81, 82], prefix_kv=trainer.prompt_kv(p1)),
        TrainSample([9, 9], [10]),
    ]
    denom = sum(s.loss_tokens for s in samples)
    ref_loss = trainer.accumulate(samples, denom)
    ref = trainer.grads()
    trainer.opt.zero_grad(set_to_none=True)
    group = LayerwiseGroup(trainer, samples, denom, min_chunk=4)
    for _ in range(500):
        if group.done:
            break
        b = max(16.0, group.max_piece_cost())
        assert group.work(b) <= b + 1e-9
    assert group.done
    assert any(c.long_sample == 1 for c in group.chunks) and any(c.packed is not None for c in group.chunks)
    assert abs(group.loss_sum - ref_loss) < 1e-4
    assert abs(float(group.sample_loss.sum()) - ref_loss) < 1e-4
    got = trainer.grads()
    for key in ref:
        grad_close(got[key][0], ref[key][0], N_TERMS)
        grad_close(got[key][1], ref[key][1], N_TERMS)
