"""A random-weight Llama checkpoint in HF format, its tokenizer and PEFT adapters, written for serving benchmarks.

Why files (and not weights generated inside the engine): the comparison with stock vLLM must load the *same*
checkpoint, tokenizer and adapters through each engine's own loader, exactly as a user would.

- The tokenizer is a word-level one with one word per token id (`w17` is id 17) over the model's whole vocabulary.
  Random weights emit any of the 128256 ids, so the tokenizer must decode every one of them; a word-level vocabulary
  also round-trips exactly (decode then encode gives back the ids), so a benchmark client's random prompts have the
  token lengths it asked for on both engines. No hub download: it is built here in well under a second.
- Base weights are N(0, 0.02) (norms 1), generated on `device` a tensor at a time and written as safetensors shards
  with an index, the layout HF uses for large models.
- Adapters carry random A and B on the chosen projections, with per-adapter ranks; beyond `distinct` adapters of a
  rank, files are hard links of an earlier adapter of that rank (still separate names, slots and uploads).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECIAL = ["<s>", "</s>", "<unk>", "<pad>"]
SHARD_BYTES = 4 << 30


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """Word-level tokenizer: ids 0-3 are <s> </s> <unk> <pad>, id i >= 4 is the word `w{i}`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(str(out))


def _proj_dims(shape: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each LoRA target projection."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    d = shape.get("head_dim") or h // shape["num_attention_heads"]
    nh, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    dims = {"q_proj": (h, nh * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d), "o_proj": (nh * d, h)}
    dims.update({"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)})
    return dims


def _weight_shapes(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of an HF LlamaForCausalLM checkpoint with its shape, in file order."""
    h, v = shape["hidden_size"], shape["vocab_size"]
    dims = _proj_dims(shape)
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        out.append((f"{p}.input_layernorm.weight", (h,)))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            fin, fout = dims[proj]
            out.append((f"{p}.self_attn.{proj}.weight", (fout, fin)))
        out.append((f"{p}.post_attention_layernorm.weight", (h,)))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            fin, fout = dims[proj]
            out.append((f"{p}.mlp.{proj}.weight", (fout, fin)))
    out.append(("model.norm.weight", (h,)))
    if not shape.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (v, h)))
    return out


def write_checkpoint(out: Path, shape: dict, device: str = "cpu", dtype: str = "bfloat16", seed: int = 0) -> Path:
    """config.json, tokenizer and sharded safetensors of a random-weight Llama with `shape` (HF LlamaConfig fields)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, shape["vocab_size"])
    LlamaConfig(**shape, bos_token_id=0, eos_token_id=1, pad_token_id=3, dtype=dtype).save_pretrained(str(out))
    tdtype = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, dims in _weight_shapes(shape):
        t = torch.empty(dims, device=device, dtype=tdtype)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=g)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t.cpu()
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return out


def write_adapter(
    out: Path, shape: dict, rank: int, base: Path, seed: int, device: str = "cpu", targets: list[str] | None = None
) -> Path:
    """One PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) with random A and B, std 0.02."""
    from safetensors.torch import save_file

    targets = targets or TARGETS
    dims = _proj_dims(shape)
    g = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for layer in range(shape["num_hidden_layers"]):
        for proj in targets:
            fin, fout = dims[proj]
            parent = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{parent}.{proj}"
            a = torch.empty(rank, fin, device=device, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)
            b = torch.empty(fout, rank, device=device, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)
            tensors[f"{key}.lora_A.weight"] = a.cpu()
            tensors[f"{key}.lora_B.weight"] = b.cpu()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
    }
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
    return out


def write_adapters(
    root: Path, shape: dict, ranks: list[int], base: Path, prefix: str, distinct: int = 4, device: str = "cpu"
) -> list[Path]:
    """Adapters `{prefix}{i}` with rank `ranks[i]`; the first `distinct` of each rank have their own weights, the
    others hard-link the files of an earlier adapter of the same rank."""
    paths: list[Path] = []
    by_rank: dict[int, list[Path]] = {}
    for i, rank in enumerate(ranks):
        out = root / f"{prefix}{i}"
        own = by_rank.setdefault(rank, [])
        if len(own) < distinct:
            write_adapter(out, shape, rank, base, seed=zlib.crc32(prefix.encode()) + i, device=device)
            own.append(out)
        else:
            out.mkdir(parents=True, exist_ok=True)
            src = own[i % len(own)]
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                if not (out / f).exists():
                    os.link(src / f, out / f)
        paths.append(out)
    return paths
