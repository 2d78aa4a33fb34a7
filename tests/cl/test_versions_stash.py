"""PEFT-format versions load in peft with identical outputs; bad candidates are refused; the stash arena evicts."""

from __future__ import annotations

import math

import torch
from lorafleet.worker.layers.attention import DenseAttentionContext
from lorafleet.worker.training.lora_context import TrainableLoRA
from lorafleet.worker.training.stash import ActivationStash
from lorafleet.worker.training.trainer import LoRATrainer, OptimConfig, TrainSample
from lorafleet.worker.training.versions import PublishPolicy, VersionPublisher, save_peft_adapter


def test_saved_version_equals_trained_adapter_in_peft(tmp_path, tiny_dir, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = TrainableLoRA(tiny_model.shape, rank=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "down_proj"])
    trainer = LoRATrainer(tiny_model, lora, OptimConfig(lr=1e-2))
    for _ in range(3):
        trainer.train_step([TrainSample([5, 6, 7], [8, 9, 10])])
    out = save_peft_adapter(tmp_path / "ad" / "v1", lora.export(), 4, 8, lora.targets, str(tiny_dir))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    ids = torch.tensor([3, 44, 12, 90, 7])
    with torch.no_grad():
        ours = tiny_model.compute_logits(
            tiny_model(ids, torch.arange(5), DenseAttentionContext(tiny_model.attn_scale), trainer.ctx)
        )
        base = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
        ref = PeftModel.from_pretrained(base, str(out))(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    # round trip back into a trainable adapter
    again = TrainableLoRA.from_peft(tiny_model.shape, out)
    for k, (a, b) in lora.export().items():
        torch.testing.assert_close(again.export()[k][0], a)
        torch.testing.assert_close(again.export()[k][1], b)


def test_publisher_refuses_nan_and_spikes():
    pub = VersionPublisher(PublishPolicy(every_steps=5, max_loss_spike=2.0))
    assert not pub.due(3) and pub.due(5)
    for _ in range(10):
        pub.observe_loss(1.0)
    assert pub.check(1.1, True, None) is None
    assert "spike" in pub.check(5.0, True, None)
    assert "non-finite" in pub.check(math.nan, True, None)
    assert "weights" in pub.check(1.0, False, None)
    pub.refuse(5, "loss spike")
    assert not pub.due(6) and pub.due(10)


def test_stash_ring_evicts_oldest_and_counts():
    kv = torch.ones(4, 2, 8)  # 256 bytes each for K and V
    st = ActivationStash(capacity_bytes=2048)
    for r in range(5):
        st.begin(f"r{r}", "ad", 1, 0, num_layers=2)
        for layer in range(2):
            assert st.add(f"r{r}", layer, kv * r, kv * -r)
        assert st.finish(f"r{r}", [1, 2, 3, 4])
    # 1 KiB per request, 2 KiB arena: only the last two survive
    assert not st.has("r0") and not st.has("r2") and st.has("r3") and st.has("r4")
    assert st.counters.recorded == 5 and st.counters.evicted == 3
    e = st.take("r4")
    layers = st.load(e, "cpu")
    assert torch.equal(layers[1][0], kv * 4) and torch.equal(layers[0][1], kv * -4)
    # a prompt larger than the whole arena is skipped, never blocks
    st.begin("big", "ad", 1, 0, num_layers=1)
    assert not st.add("big", 0, torch.ones(64, 2, 8), torch.ones(64, 2, 8))
    assert st.counters.skipped == 1
    # a recording whose token count does not match the prompt is not stashed
    st.begin("short", "ad", 1, 0, num_layers=1)
    st.add("short", 0, kv, kv)
    assert not st.finish("short", [1, 2])


def test_heldout_gate_compares_with_the_serving_version_and_asks_for_min_improvement():
    pub = VersionPublisher(PublishPolicy(on_heldout_improvement=True, min_improvement=0.1))
    assert pub.check(1.0, True, 5.0) is None  # no reference at all (nothing measured yet): published
    assert "no feedback is held out" in pub.check(1.0, True, None)  # nothing held out: the gate cannot pass it
    assert pub.check(1.0, True, 0.89, serving_heldout=1.0) is None  # 11% better than the serving version
    why = pub.check(1.0, True, 0.95, serving_heldout=1.0)  # better, but by less than 10%
    assert why == "no held-out improvement: 0.95 >= 0.9 (the serving version's 1)"
    pub.record(5, 2, 1.0, 2.0, "/x")
    assert "the best published 2" in pub.check(1.0, True, 1.9)  # without the serving version's loss: the best
    pub.refuse(10, why, 0.95, 1.0)
    assert pub.refused[-1] == {"step": 10, "reason": why, "heldoutLoss": 0.95, "servingHeldoutLoss": 1.0}
    assert VersionPublisher(PublishPolicy()).check(1.0, True, 9.0, 1.0) is None  # off
