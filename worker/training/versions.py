"""Live adapter versions: when to publish, how to refuse bad candidates, and the PEFT-format writer.

Why: the operator rolls versions out to other replicas by reading the adapter store, and every replica loads adapters
through the PEFT loader, so a version must be a plain PEFT directory (`adapter_config.json` +
`adapter_model.safetensors`, keys `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`).
A version is written to a fresh directory and renamed into place, so a reader never sees half a version. A candidate
with NaN/inf weights or loss, or a loss spike over `max_loss_spike` x the running loss, is refused and reported.
With `on_heldout_improvement` (the held-out gate) a candidate must also beat the *serving* version's loss on the same
held-out samples by `min_improvement` (relative): the held-out set grows with the feedback, so a loss recorded at
an earlier publish is no reference, and the first trained candidate must beat the version it would replace. While
no feedback is held out yet the gate has nothing to compare, so it refuses rather than publish an ungated version.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")


def peft_key(layer: int, proj: str, which: str) -> str:
    block = "self_attn" if proj in ATTN_PROJS else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{proj}.lora_{which}.weight"


def save_peft_adapter(
    out_dir: str | Path,
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    alpha: float,
    targets: list[str],
    base_model: str = "",
    use_rslora: bool = False,
    extra_meta: dict | None = None,
) -> Path:
    """Writes {(layer, proj): (A [r, in], B [out, r])} as a PEFT LoRA adapter, atomically (tmp dir + rename)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}-{time.monotonic_ns()}")
    tmp.mkdir(parents=True)
    tensors = {}
    for (layer, proj), (a, b) in weights.items():
        tensors[peft_key(layer, proj, "A")] = a.detach().float().cpu().contiguous()
        tensors[peft_key(layer, proj, "B")] = b.detach().float().cpu().contiguous()
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "use_rslora": use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    if extra_meta:  # beside, not inside, adapter_config.json: peft warns about unknown config keys
        (tmp / "lorafleet_version.json").write_text(json.dumps(extra_meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def load_peft_adapter(path: str | Path) -> tuple[dict, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]]:
    """Reads a PEFT LoRA adapter back as (config, {(layer, proj): (A, B)}); tolerates the `.default` infix."""
    from safetensors.torch import load_file

    p = Path(path)
    cfg = json.loads((p / "adapter_config.json").read_text())
    raw = load_file(str(p / "adapter_model.safetensors"))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in raw.items():
        parts = k.split(".")
        if "layers" not in parts:
            continue
        layer = int(parts[parts.index("layers") + 1])
        which = "A" if "lora_A" in parts else "B" if "lora_B" in parts else None
        proj = next((x for x in parts if x in ATTN_PROJS + MLP_PROJS), None)
        if which is None or proj is None:
            continue
        pairs.setdefault((layer, proj), {})[which] = v
    return cfg, {k: (d["A"], d["B"]) for k, d in pairs.items() if "A" in d and "B" in d}


@dataclass
class VersionRecord:
    version: int
    step: int
    loss: float | None
    heldout_loss: float | None
    path: str
    published_at: str

    def to_api(self) -> dict:
        """The fields in camelCase (`heldoutLoss`, `publishedAt`)."""
        return {re.sub(r"_(\w)", lambda m: m[1].upper(), k): v for k, v in self.__dict__.items()}


@dataclass
class PublishPolicy:
    every_steps: int = 20
    on_heldout_improvement: bool = False
    max_loss_spike: float = 2.0
    min_improvement: float = 0.0  # relative held-out loss improvement over the serving version the gate asks for


@dataclass
class VersionPublisher:
    """Decides when a candidate is due and whether it is sane; the job's lifecycle saves and publishes it."""

    policy: PublishPolicy
    published: list[VersionRecord] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)
    _last_step: int = 0
    _best_heldout: float = math.inf
    _loss_ref: float | None = None

    def state(self) -> dict:
        """What a checkpoint keeps (the spike reference and the records, so a resumed job decides as before)."""
        return {
            "lastStep": self._last_step,
            "lossRef": self._loss_ref,
            "bestHeldout": self._best_heldout if math.isfinite(self._best_heldout) else None,
            "published": [r.__dict__ for r in self.published],
            "refused": list(self.refused),
        }

    def restore(self, st: dict) -> None:
        self._last_step = int(st["lastStep"])
        self._loss_ref = st["lossRef"]
        self._best_heldout = math.inf if st["bestHeldout"] is None else float(st["bestHeldout"])
        self.published = [VersionRecord(**r) for r in st["published"]]
        self.refused = list(st["refused"])

    def due(self, step: int) -> bool:
        return step - self._last_step >= self.policy.every_steps

    def observe_loss(self, loss: float) -> None:
        """Running reference loss for spike detection (slow EMA of finite step losses)."""
        if math.isfinite(loss):
            self._loss_ref = loss if self._loss_ref is None else 0.9 * self._loss_ref + 0.1 * loss

    def check(
        self, loss: float | None, weights_finite: bool, heldout_loss: float | None, serving_heldout: float | None = None
    ) -> str | None:
        """Returns why the candidate must be refused, or None if it may be published. `serving_heldout`: the serving
        version's loss on the same held-out samples (the gate's reference; without it, the best published one)."""
        if not weights_finite:
            return "non-finite adapter weights"
        if loss is not None and not math.isfinite(loss):
            return f"non-finite loss {loss}"
        if loss is not None and self._loss_ref is not None and loss > self.policy.max_loss_spike * self._loss_ref:
            return f"loss spike: {loss:.4g} > {self.policy.max_loss_spike} x {self._loss_ref:.4g}"
        if heldout_loss is not None and not math.isfinite(heldout_loss):
            return f"non-finite held-out loss {heldout_loss}"
        if self.policy.on_heldout_improvement:
            if heldout_loss is None:
                return "no held-out improvement measurable: no feedback is held out yet"
            ref = serving_heldout if serving_heldout is not None else self._best_heldout
            need = ref * (1.0 - self.policy.min_improvement)
            if heldout_loss >= need:
                what = "the serving version's" if serving_heldout is not None else "the best published"
                return f"no held-out improvement: {heldout_loss:.4g} >= {need:.4g} ({what} {ref:.4g})"
        return None

    def refuse(
        self, step: int, reason: str, heldout: float | None = None, serving_heldout: float | None = None
    ) -> None:
        self._last_step = step
        losses = {"heldoutLoss": heldout, "servingHeldoutLoss": serving_heldout}
        self.refused.append({"step": step, "reason": reason, **{k: v for k, v in losses.items() if v is not None}})

    def record(self, step: int, version: int, loss: float | None, heldout: float | None, path: Path) -> VersionRecord:
        self._last_step = step
        if heldout is not None:
            self._best_heldout = min(self._best_heldout, heldout)
        rec = VersionRecord(version, step, loss, heldout, str(path), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.published.append(rec)
        return rec
