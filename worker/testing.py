"""Tiny Llama-family checkpoints, tokenizers and PEFT adapters built in code.

No hub downloads happen at run time, so tests, benchmarks and `lorafleet up` build their models here. The
checkpoints are real HF-format directories (config.json + model.safetensors + tokenizer files), so the engine
loads them through exactly the same path as a production checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

_WORDS = (
    "the a fleet of models serves many adapters and learns from feedback every day while the operator places "
    "each adapter on a worker with spare memory and low load so that requests never wait long capital city "
    "of france is paris germany berlin italy rome spain madrid answer question hello world good bad yes no "
    "one two three four five six seven eight nine ten red green blue cat dog bird fish tree river mountain"
).split()


def _corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) for _ in range(n_lines)]


def build_tokenizer(out_dir: str | Path, vocab_size: int = 384):
    """A byte-level BPE trained in well under a second; wrapped as a fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


@dataclass
class TinyLlamaSpec:
    """Shape of a tiny model; defaults exercise GQA (4 query heads over 2 KV heads) and untied embeddings."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    vocab_size: int = 384
    extra: dict = field(default_factory=dict)


def build_tiny_llama(
    out_dir: str | Path, spec: TinyLlamaSpec | None = None, seed: int = 0, dtype: str = "float32"
) -> Path:
    """Writes an HF-format Llama checkpoint with random weights (and a tokenizer) to `out_dir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec or TinyLlamaSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, vocab_size=spec.vocab_size)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        rope_scaling=spec.rope_scaling,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.1,
        **spec.extra,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def build_peft_adapter(
    out_dir: str | Path,
    base_dir: str | Path,
    rank: int = 8,
    alpha: float | None = None,
    seed: int = 1,
    use_rslora: bool = False,
    targets: list[str] | None = None,
    std: float = 0.05,
) -> Path:
    """Writes a PEFT LoRA adapter with random A *and* B (a fresh peft adapter has B = 0 and equals the base)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=targets or LORA_TARGETS,
        lora_dropout=0.0,
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    meta = json.loads((out / "adapter_config.json").read_text())
    meta["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(meta, indent=2))
    return out


class StepLog:
    """An engine plugin (engine/plugin.py) for tests and benchmarks: keeps every step's `IterationInfo` after the
    step is settled, and, with `on_launch`, calls it with each step's info while its tokens are still in flight."""

    def __init__(self, on_launch=None) -> None:
        self.infos: list = []
        self.on_launch = on_launch

    def attach(self, engine) -> None:
        return None

    def on_prefill(self, batch, inputs):
        return None

    def after_launch(self, info) -> None:
        if self.on_launch is not None:
            self.on_launch(info)

    def after_step(self, info) -> None:
        self.infos.append(info)

    def on_finish(self, request) -> None:
        return None
