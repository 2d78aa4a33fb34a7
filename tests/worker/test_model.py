"""Numerical equality of our model + paged KV + batched LoRA with transformers + peft on the same weights.

Tolerance: everything runs in fp32 on CPU; the only differences are summation order (our padded SDPA over the
paged cache vs HF's attention, shrink/expand vs peft's two Linear calls), which give ~1e-6 absolute error on
logits of magnitude ~1-10. We assert atol 1e-4, two orders above the observed noise and far below any real bug
(a wrong adapter, scale or position changes logits by >1e-1).
"""

from __future__ import annotations

import pytest
import torch
from lorafleet.worker.engine.sequence import SamplingParams

ATOL = 1e-4
MIX = [None, "ad-r4", "ad-r8", "ad-r16rs", "ad-r2qv", "ad-r4", None, "ad-r8v2"]


def _prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 14) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(10, 370, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


def _hf_logits(pm, seqs: list[list[int]], names: list[str | None]) -> list[torch.Tensor]:
    """One mixed-adapter HF batch (right padded, attention mask), last-position logits per row."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        logits = pm(input_ids=ids, attention_mask=mask, adapter_names=[n or "__base__" for n in names]).logits
    return [logits[i, len(s) - 1] for i, s in enumerate(seqs)]


def _engine_logits(eng, batch) -> dict[str, torch.Tensor]:
    seqs, logits = eng.runner.logits_for(batch)
    for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
        seq.num_computed_tokens += n
    return {s.request_id: logits[i] for i, s in enumerate(seqs)}


def test_mixed_batch_prefill_and_paged_decode_match_hf_peft(make_engine, adapters, hf_peft):
    eng = make_engine(max_loras=8, block_size=4)
    for name in set(MIX) - {None}:
        eng.load_adapter(name, str(adapters[name]))
    prompts = _prompts(len(MIX))
    for i, (p, name) in enumerate(zip(prompts, MIX, strict=True)):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=8), name)
    batch = eng.scheduler.schedule()
    assert len(batch) == len(MIX) and {s.slot for s in batch.seqs} >= {-1, 0, 1, 2, 3, 4}
    ours = _engine_logits(eng, batch)
    ref = _hf_logits(hf_peft, prompts, MIX)
    base_ref = _hf_logits(hf_peft, prompts, [None] * len(MIX))
    for i in range(len(MIX)):
        torch.testing.assert_close(ours[f"r{i}"], ref[i], atol=ATOL, rtol=0)
        if MIX[i] is not None:  # the adapter really changes the output (B was randomised)
            assert (ref[i] - base_ref[i]).abs().max() > 1e-2
    seqs = {s.request_id: s for s in batch.seqs}
    # several paged decode steps: each appends the argmax token, crossing block boundaries (block_size 4)
    for _ in range(5):
        for rid, lg in ours.items():
            seqs[rid].token_ids.append(int(lg.argmax()))
        batch = eng.scheduler.schedule()
        assert all(n == 1 for n in batch.num_tokens)
        ours = _engine_logits(eng, batch)
        ref = _hf_logits(hf_peft, [seqs[f"r{i}"].token_ids for i in range(len(MIX))], MIX)
        for i in range(len(MIX)):
            torch.testing.assert_close(ours[f"r{i}"], ref[i], atol=ATOL, rtol=0)


def test_greedy_generation_matches_hf_generate(make_engine, adapters, hf_greedy):
    eng = make_engine(max_loras=4)
    names = [None, "ad-r4", "ad-r16rs", "ad-r2qv"]
    for n in names[1:]:
        eng.load_adapter(n, str(adapters[n]))
    prompts = _prompts(len(names), seed=3)
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), names)
    for p, o, n in zip(prompts, outs, names, strict=True):
        assert o.output_token_ids == hf_greedy(p, 20, n), n
        assert o.finish_reason == "length" and o.lora_name == n


def no_eos_config(n: int):
    """Greedy for exactly n tokens: no EOS at all (min_new_tokens would instead *suppress* EOS logits)."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)


def _compare_with_hf(make_engine, model_dir, prompt_len: int = 40, atol: float = ATOL):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    hf.generation_config.eos_token_id = None  # greedy for exactly n tokens, like ignore_eos
    eng = make_engine(model=model_dir, num_kv_blocks=64, block_size=8)
    prompts = [list(range(5, 5 + prompt_len)), list(range(100, 100 + prompt_len // 2))]
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    ours = _engine_logits(eng, eng.scheduler.schedule())
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(ours[f"r{i}"], ref, atol=atol, rtol=0)
        eng.abort_request(f"r{i}")
    assert eng.block_manager.num_free == eng.block_manager.num_blocks
    outs = {
        o.request_id: o
        for o in eng.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    }
    with torch.no_grad():
        ids = torch.tensor([prompts[0]])
        ref_tokens = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=no_eos_config(6))
    assert next(iter(outs.values())).output_token_ids == ref_tokens[0, len(prompts[0]) :].tolist()
    return eng


def test_rope_scaling_llama3_linear_yarn_match_hf(tmp_path, make_engine):
    from lorafleet.worker.testing import TinyLlamaSpec, build_tiny_llama

    llama3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    for name, scaling in (("llama3", llama3), ("linear", {"rope_type": "linear", "factor": 4.0}), ("yarn", yarn)):
        d = build_tiny_llama(tmp_path / name, TinyLlamaSpec(rope_scaling=scaling, rope_theta=500.0), seed=5)
        _compare_with_hf(make_engine, d, prompt_len=60)  # positions well past original_max_position_embeddings


def test_qwen2_shape_with_qkv_bias_and_tied_embeddings(tmp_path, make_engine):
    from lorafleet.worker.testing import build_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer(tmp_path)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, initializer_range=0.1,
    )  # fmt: skip
    torch.manual_seed(7)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.2)  # non-zero q/k/v biases so a dropped bias would show
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    eng = _compare_with_hf(make_engine, tmp_path)
    assert eng.model.shape.qkv_bias and not eng.model.shape.o_bias and eng.model.shape.tie_word_embeddings


def test_mistral_shape_with_sliding_window(tmp_path, make_engine):
    from lorafleet.worker.testing import build_tokenizer
    from transformers import MistralConfig, MistralForCausalLM

    tok = build_tokenizer(tmp_path)
    cfg = MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=512, sliding_window=12,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, initializer_range=0.1,
    )  # fmt: skip
    torch.manual_seed(8)
    MistralForCausalLM(cfg).save_pretrained(str(tmp_path), safe_serialization=True)
    eng = _compare_with_hf(make_engine, tmp_path, prompt_len=30)
    assert eng.model.shape.sliding_window == 12 and eng.model.shape.head_dim == 32


def test_dynamic_rope_is_refused_clearly(tmp_path):
    from lorafleet.worker.loader import load_model
    from lorafleet.worker.testing import TinyLlamaSpec, build_tiny_llama

    d = build_tiny_llama(tmp_path, TinyLlamaSpec(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ValueError, match="unsupported rope_type 'dynamic'"):
        load_model(d, torch.device("cpu"), torch.float32)


def test_sharded_checkpoint_llama2_mha_with_biases(tmp_path, make_engine):
    """Llama-2 shape (no GQA) with attention/MLP biases, saved as several safetensors shards + index."""
    from lorafleet.worker.testing import TinyLlamaSpec, build_tiny_llama
    from transformers import AutoModelForCausalLM

    src = build_tiny_llama(
        tmp_path / "src", TinyLlamaSpec(num_key_value_heads=4, extra={"attention_bias": True, "mlp_bias": True})
    )
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.2)
    out = tmp_path / "sharded"
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).exists():
            (out / f).write_bytes((src / f).read_bytes())
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) > 2
    eng = _compare_with_hf(make_engine, out)
    s = eng.model.shape
    assert s.num_kv_heads == s.num_heads and s.qkv_bias and s.o_bias and s.mlp_bias


def test_pickle_only_checkpoint_is_refused(tmp_path):
    from lorafleet.worker.loader import iter_weights

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="only pickle weights"):
        list(iter_weights(tmp_path))
