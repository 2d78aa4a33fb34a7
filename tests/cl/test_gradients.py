"""Our LoRA gradients equal transformers+peft's on the same batch; stash-style prefix training is defined exactly."""

from __future__ import annotations

import torch
from lorafleet.worker.training.lora_context import TrainableLoRA
from lorafleet.worker.training.trainer import LoRATrainer, OptimConfig, TrainSample

SAMPLES = [([3, 17, 40, 9, 22], [51, 60, 7]), ([8, 8, 90], [33, 12, 5, 71, 2]), ([100, 4], [9])]


def _peft_grads(tiny_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    width = max(len(p) + len(c) for p, c in SAMPLES)
    ids = torch.zeros(len(SAMPLES), width, dtype=torch.long)
    labels = torch.full((len(SAMPLES), width), -100)
    mask = torch.zeros(len(SAMPLES), width, dtype=torch.long)
    for i, (p, c) in enumerate(SAMPLES):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(c)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        parts = name.split(".")
        layer = int(parts[parts.index("layers") + 1])
        proj = parts[parts.index("lora_A" if "lora_A" in parts else "lora_B") - 1]
        grads.setdefault((layer, proj), {})["A" if "lora_A" in parts else "B"] = p.grad.detach()
    return float(out.loss.detach()), grads


def test_lora_gradients_equal_peft(tiny_dir, adapter_dir, tiny_model):
    lora = TrainableLoRA.from_peft(tiny_model.shape, adapter_dir)
    trainer = LoRATrainer(tiny_model, lora, OptimConfig(max_grad_norm=None))
    samples = [TrainSample(p, c) for p, c in SAMPLES]
    tokens = sum(s.loss_tokens for s in samples)
    ours_loss = trainer.accumulate(samples, tokens) / tokens
    ref_loss, ref = _peft_grads(tiny_dir, adapter_dir)
    assert abs(ours_loss - ref_loss) < 1e-5
    ours = trainer.grads()
    assert set(ours) == set(ref) and len(ours) == 2 * 7
    for key, (ga, gb) in ours.items():
        torch.testing.assert_close(ga, ref[key]["A"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gb, ref[key]["B"], rtol=1e-4, atol=1e-6)
        assert float(gb.abs().sum()) > 0  # the comparison is not vacuous
    # the base stays frozen: no gradient anywhere in the engine's model
    assert all(p.grad is None for p in tiny_model.parameters())


def test_prefix_forward_loss_equals_full_loss(adapter_dir, tiny_model):
    """Forwarding only the completion against the prompt's K/V gives the same loss as the full forward (values are
    exact); only the gradient paths through the prompt K/V are cut, so gradients differ from full backprop."""
    lora = TrainableLoRA.from_peft(tiny_model.shape, adapter_dir)
    trainer = LoRATrainer(tiny_model, lora)
    p, c = SAMPLES[1]
    full = trainer.loss_sum(TrainSample(p, c))
    prefix = trainer.prompt_kv(p)
    assert prefix[0][0].shape[0] == len(p) - 1
    reused = trainer.loss_sum(TrainSample(p, c, prefix_kv=prefix))
    torch.testing.assert_close(reused, full, rtol=1e-5, atol=1e-5)
    full.backward()
    g_full = trainer.grads()
    trainer.opt.zero_grad(set_to_none=True)
    reused.backward()
    g_reused = trainer.grads()
    # B of the last layer's o_proj only sees completion-token paths through the residual stream: but a k_proj/v_proj
    # gradient of layer 0 flows through the prompt tokens in full backprop and is therefore different.
    assert not torch.allclose(g_full[(0, "k_proj")][1], g_reused[(0, "k_proj")][1], rtol=1e-3, atol=1e-7)


def test_train_step_reduces_loss_and_keeps_fp32_masters(tiny_model):
    lora = TrainableLoRA(tiny_model.shape, rank=4, alpha=8, targets=["q_proj", "v_proj", "o_proj"], seed=1)
    trainer = LoRATrainer(tiny_model, lora, OptimConfig(lr=5e-3))
    samples = [TrainSample(p, c) for p, c in SAMPLES]
    first = trainer.eval_loss(samples)
    for _ in range(30):
        trainer.train_step(samples)
    assert trainer.step == 30
    assert trainer.eval_loss(samples) < 0.7 * first
    assert all(p.dtype == torch.float32 for p in lora.parameters())
