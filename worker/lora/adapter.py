"""PEFT LoRA adapters: read adapter_config.json + adapter_model.safetensors and validate them against the base.

Why strict: a worker serves many tenants' adapters; loading must never execute code (no pickle), and an adapter
that does not fit the base model (wrong shapes, unknown modules, rank over the slot limit, DoRA, embedding LoRA)
is refused with an `AdapterError` that says exactly why, while the worker keeps serving everything else.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lorafleet.worker.models.llama import PROJ_NAMES, ModelShape

_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}


class AdapterError(ValueError):
    """The adapter cannot be served by this base model / worker (bad format, shape, rank, location)."""


class UnknownAdapterError(KeyError):
    """No adapter of this name is registered."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "unknown adapter"


@dataclass
class LoRAWeights:
    """One adapter version in host memory: per (layer, projection) A [r, in] and B [out, r]."""

    rank: int
    alpha: float
    use_rslora: bool
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    digest: str = ""

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())

    @property
    def targets(self) -> set[str]:
        return {p for _, p in self.weights}


def _read_config(d: Path) -> dict:
    cfg_file = d / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"{d}: adapter_config.json not found")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{cfg_file}: invalid JSON ({exc})") from exc
    except (UnicodeDecodeError, RecursionError) as exc:
        raise AdapterError(f"{cfg_file}: unreadable ({type(exc).__name__})") from exc
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_file}: must hold a JSON object")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{d}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, bad in (("use_dora", True), ("rank_pattern", None), ("alpha_pattern", None), ("modules_to_save", None)):
        val = cfg.get(key)
        if (bad is True and val) or (bad is None and val):
            raise AdapterError(f"{d}: {key}={val!r} is not supported (plain LoRA with one rank/alpha only)")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{d}: bias={cfg['bias']!r} is not supported")
    return cfg


def read_adapter(path: str | Path, shape: ModelShape, max_rank: int, dtype: torch.dtype = torch.float32) -> LoRAWeights:
    """Loads and validates an adapter directory; raises AdapterError with the reason on any misfit."""
    from safetensors import SafetensorError, safe_open

    d = Path(path)
    if not d.is_dir():
        raise AdapterError(f"adapter path {d} is not a directory")
    cfg = _read_config(d)
    st = d / "adapter_model.safetensors"
    if not st.is_file():
        if (d / "adapter_model.bin").exists() or any(d.glob("*.bin")) or any(d.glob("*.pt")):
            raise AdapterError(
                f"{d}: only pickle weights (adapter_model.bin) found; refusing to unpickle, need safetensors"
            )
        raise AdapterError(f"{d}: adapter_model.safetensors not found")
    rank = cfg.get("r", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:  # 1e999 parses as inf, "8" as a string
        raise AdapterError(f"{d}: invalid rank r={rank!r} (a positive integer)")
    alpha = cfg.get("lora_alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"{d}: invalid lora_alpha={alpha!r} (a positive finite number)")
    if rank > max_rank:
        raise AdapterError(f"{d}: rank {rank} exceeds this worker's max_lora_rank {max_rank}")
    out = LoRAWeights(rank=rank, alpha=float(alpha), use_rslora=bool(cfg.get("use_rslora", False)))
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    h = hashlib.sha256((d / "adapter_config.json").read_bytes())
    h.update(st.read_bytes())
    out.digest = h.hexdigest()[:12]
    try:
        with safe_open(str(st), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                m = _KEY.search(key)
                if not m:
                    raise AdapterError(f"{d}: unsupported tensor {key!r} (only q,k,v,o,gate,up,down LoRA A/B)")
                layer, parent, proj, ab = int(m[1]), m[2], m[3], m[4]
                if proj not in PROJ_NAMES or _PARENT.get(proj, "mlp") != parent:
                    raise AdapterError(f"{d}: unsupported target module {parent}.{proj}")
                if layer >= shape.num_layers:
                    raise AdapterError(f"{d}: layer {layer} does not exist (base has {shape.num_layers} layers)")
                halves.setdefault((layer, proj), {})[ab] = fh.get_tensor(key)
    except SafetensorError as exc:
        raise AdapterError(f"{d}: unreadable safetensors ({exc})") from exc
    if not halves:
        raise AdapterError(f"{d}: no LoRA tensors found")
    for (layer, proj), ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{d}: layer {layer} {proj} has lora_{''.join(ab)} only")
        fin, fout = shape.proj_dims(proj)
        a, b = ab["A"], ab["B"]
        if tuple(a.shape) != (rank, fin) or tuple(b.shape) != (fout, rank):
            raise AdapterError(
                f"{d}: layer {layer} {proj}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                f"model (expected ({rank}, {fin}) / ({fout}, {rank}))"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{d}: layer {layer} {proj} contains NaN/Inf")
        out.weights[(layer, proj)] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
    return out
