"""The merged copy of the base projections: one adapter's scaled B·A folded in, the base weights never touched.

Why a copy and not an in-place merge: the base weights must come back bit-exactly on unmerge, and the
co-serving trainer runs its own forwards over the same modules between serving steps (training/), so they must
hold the base at every moment. Restoring in place exactly would need the original bytes kept somewhere anyway
(W + ΔW - ΔW is not W in floating point), so the copy costs no more memory than an exact in-place scheme and
makes unmerge free: a merged step reads the copy through `MergedLoRAContext.merged_weight`, an unmerged one reads
the base. The copy is allocated once (one buffer per projection, or per fused group on GPU, at a fixed address so
that CUDA graphs captured over it stay valid) and is what `--merge-switch` costs: the bytes of every adapted
projection of the model.

`merge(av)` writes `W + scale · B·A` for the projections the version adapts (computed in fp32, rounded once to
the weight dtype) and `W` for the others, reading A and B from the version's GPU slot; the caller keeps that slot
pinned while merged, because rows of other adapters subtract the merged delta from those same slot tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from lorafleet.worker.layers.linear import LoRALinear
from lorafleet.worker.layers.lora_context import MergedLoRAContext
from lorafleet.worker.lora.store import GROUPS, AdapterStore, AdapterVersion

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    """One merged buffer: the base tensor it copies and the projections' row ranges inside it."""

    layer: int
    name: str  # projection, or group name when the base runs the group as one fused GEMM
    base: torch.Tensor
    buf: torch.Tensor
    members: tuple[tuple[str, int, int], ...]  # (projection, first row, end row)


def _projections(model):
    """(layer, name, base weight, members) of every buffer: fused groups as one (GPU), else each projection."""
    for li, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for owner, group in ((attn, "qkv"), (mlp, "gate_up")):
            projs = GROUPS[group]
            mods = [getattr(owner, p) for p in projs]
            if owner.fused is not None:
                bounds = [0]
                for m in mods:
                    bounds.append(bounds[-1] + m.out_features)
                yield li, group, owner.fused.weight, tuple((p, bounds[i], bounds[i + 1]) for i, p in enumerate(projs))
            else:
                for p, m in zip(projs, mods, strict=True):
                    yield li, p, m.weight, ((p, 0, m.out_features),)
        for owner, p in ((attn, "o_proj"), (mlp, "down_proj")):
            m = getattr(owner, p)
            yield li, p, m.weight, ((p, 0, m.out_features),)


class MergedWeights:
    def __init__(self, model, store: AdapterStore) -> None:
        self.store = store
        for mod in model.modules():  # a projection whose forward does not read `merged_weight` would serve W
            if isinstance(mod, LoRALinear) and type(mod).forward is not LoRALinear.forward:
                raise ValueError(f"merge switching does not support {type(mod).__name__} projections")
        specs = list(_projections(model))
        self.nbytes = sum(base.numel() * base.element_size() for _, _, base, _ in specs)
        device = specs[0][2].device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if self.nbytes > free:
                raise ValueError(
                    f"merge switching needs a {self.nbytes / 2**30:.1f} GiB copy of the adapted projections and "
                    f"{free / 2**30:.1f} GiB are free on the GPU (lower kv_cache_fraction or turn merge_switch off)"
                )
        self.entries = [_Entry(li, name, base, base.detach().clone(), members) for li, name, base, members in specs]
        self.by_key = {(e.layer, e.name): e.buf for e in self.entries}
        self.merged: AdapterVersion | None = None
        self.merged_targets: frozenset[str] = frozenset()
        self._dirty: set[int] = set()  # entries whose buffer differs from the base
        self.neg_scales = torch.zeros_like(store.scales)  # -scale of the merged slot, for the subtracting pass
        log.info("merged-weight copy: %.1f MiB", self.nbytes / 2**20)

    def targets(self, av: AdapterVersion) -> frozenset[str]:
        """Names (projections and fused groups) whose merged buffer differs from the base for `av`."""
        names = set(av.targets)
        for group, projs in GROUPS.items():
            if any(p in av.targets for p in projs):
                names.add(group)
        return frozenset(names)

    @torch.no_grad()
    def merge(self, av: AdapterVersion) -> None:
        """Folds `av` (resident in a GPU slot) into the buffers; queued on the current stream on CUDA, so the
        steps already queued read the previous contents and the next step reads these."""
        slot = av.slot
        if slot is None:
            raise RuntimeError(f"adapter {av.name} has no GPU slot to merge from")
        self.store.wait_ready([slot])
        scale = float(torch.tensor(av.scale, dtype=torch.float32))  # the fp32 value the unmerged path multiplies
        r = av.rank
        dirty: set[int] = set()
        for i, e in enumerate(self.entries):
            hit = [(p, lo, hi) for p, lo, hi in e.members if p in av.targets]
            if not hit:
                if i in self._dirty:
                    e.buf.copy_(e.base)
                continue
            if i in self._dirty and len(hit) < len(e.members):
                e.buf.copy_(e.base)  # rows of projections this version does not adapt
            for p, lo, hi in hit:
                stacked = self.store.stacked(e.layer, p, always=True)
                assert stacked is not None
                a, b = stacked[0][slot, :r].float(), stacked[1][slot, :, :r].float()
                e.buf[lo:hi].copy_(torch.addmm(e.base[lo:hi].float(), b, a, alpha=scale))
            dirty.add(i)
        self._dirty = dirty
        self.neg_scales.zero_()
        self.neg_scales[slot] = -scale
        self.merged = av
        self.merged_targets = self.targets(av)

    def context(
        self, seg_indptr, seg_slots, neg_indptr, neg_slots, own: bool, neg: bool, always: bool = False
    ) -> MergedLoRAContext:
        """The LoRA context of a merged step over these segments (`always`: every projection, for CUDA graphs)."""
        targets = None if always else self.merged_targets
        return MergedLoRAContext(
            self.by_key,
            self.store,
            self.neg_scales,
            seg_indptr,
            seg_slots,
            neg_indptr,
            neg_slots,
            own,
            neg,
            targets,
            always,
        )

    def unmerge(self) -> None:
        """Serving reads the base again; the buffers keep their contents until the next merge rewrites them."""
        self.merged = None
