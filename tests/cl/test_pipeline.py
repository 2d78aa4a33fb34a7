"""Chunked forward + layer-by-layer backward (FlexLLM) gives the same gradients as one monolithic backward."""

from __future__ import annotations

import pytest
import torch
from lorafleet.worker.training.lora_context import TrainableLoRA
from lorafleet.worker.training.pipeline import LayerwiseSequence
from lorafleet.worker.training.trainer import LoRATrainer, TrainSample


@pytest.mark.timeout(120)
def test_layerwise_chunked_equals_monolithic(adapter_dir, tiny_model):
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
        torch.testing.assert_close(got[key][0], ref[key][0], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got[key][1], ref[key][1], rtol=1e-4, atol=1e-7)


@pytest.mark.timeout(120)
def test_layerwise_with_prefix_equals_trainer(adapter_dir, tiny_model):
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
        torch.testing.assert_close(got[key][1], ref[key][1], rtol=1e-4, atol=1e-7)
