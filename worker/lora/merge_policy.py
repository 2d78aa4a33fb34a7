"""When to serve one adapter merged into the base weights (dLoRA's merged/unmerged switching), as pure functions.

Why: with unmerged serving every token row pays its adapter's shrink/expand on every adapted projection. When one
adapter holds most rows of the running batch, folding its scaled B·A into (a copy of) the base weights removes
that work for its rows; the other rows then run `(their LoRA) - (merged LoRA)` through the same kernels
(`lora/merged.py`). Whether that pays depends on the batch: `CostModel` estimates the LoRA seconds of one step in
each mode from the batch composition alone (`BatchMix`), and `decide` switches with dLoRA's credit scheme: every
step, each alternative mode earns the seconds it would have saved over the current one (and loses what it would
have cost, never below zero); a switch happens when an alternative's credit pays for a round trip (merge plus
unmerge), after which every credit restarts at zero. A mode that is not an alternative in a step loses its credit,
so a batch whose dominant adapter alternates never merges, and one unlucky step never undoes a merge.

Everything here is a pure function of its arguments: the engine side (`engine/merge_switch.py`) turns the live
batch into a `BatchMix`, applies the decision between two steps, and measures what a merge really costs.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping
from dataclasses import dataclass, field

Key = Hashable  # one adapter version (the engine uses the AdapterVersion object itself)


@dataclass(frozen=True)
class BatchMix:
    """One step's rows (tokens) per adapter version, and rows without an adapter."""

    rows: Mapping[Key, int]
    base_rows: int = 0

    @property
    def lora_rows(self) -> int:
        return sum(self.rows.values())

    def top(self, allowed: Collection[Key]) -> Key | None:
        """The allowed version with the most rows (first in `rows` order on a tie), or None."""
        best, best_n = None, 0
        for key, n in self.rows.items():
            if n > best_n and key in allowed:
                best, best_n = key, n
        return best


@dataclass(frozen=True)
class CostModel:
    """Seconds of one step's LoRA work, by mode. A *pass* is one shrink + expand over every adapted projection.

    `row_s`: one token row through one pass; `segment_s`: one adapter segment in a pass (the torch path runs one
    matmul pair per segment and projection; the Triton path reads each segment's weights once per tile);
    `pass_s`: a pass that has any rows (its kernel launches); `merge_s`: folding one adapter into the merged copy;
    `unmerge_s`: going back to the base weights (a pointer switch in this scheme, so ~0)."""

    row_s: float
    segment_s: float
    pass_s: float
    merge_s: float
    unmerge_s: float = 0.0

    def unmerged(self, mix: BatchMix) -> float:
        rows = mix.lora_rows
        segments = sum(1 for n in mix.rows.values() if n > 0)
        return self._pass(rows, segments)

    def merged(self, mix: BatchMix, key: Key) -> float:
        """The merged adapter's rows need no LoRA work; the other adapters' rows run their own pass, and every
        other row (with or without an adapter) runs one pass of the merged adapter with a negated scale, over one
        segment: the runner sorts the merged rows first, so the rest are contiguous."""
        dom = mix.rows.get(key, 0)
        own_rows = mix.lora_rows - dom
        own_segments = sum(1 for k, n in mix.rows.items() if n > 0 and k != key)
        neg_rows = own_rows + mix.base_rows
        return self._pass(own_rows, own_segments) + self._pass(neg_rows, 1 if neg_rows else 0)

    def step(self, mix: BatchMix, merged: Key | None) -> float:
        return self.unmerged(mix) if merged is None else self.merged(mix, merged)

    def switch(self, current: Key | None, target: Key | None) -> float:
        """What moving from `current` to `target` costs once (a different adapter means a new merge)."""
        if target is None:
            return self.unmerge_s if current is not None else 0.0
        return self.merge_s + (self.unmerge_s if current is not None else 0.0)

    def _pass(self, rows: int, segments: int) -> float:
        if rows <= 0:
            return 0.0
        return rows * self.row_s + segments * self.segment_s + self.pass_s


@dataclass(frozen=True)
class PolicyState:
    """The merged version (None: every adapter unmerged) and each alternative mode's credit in seconds."""

    merged: Key | None = None
    credits: Mapping[Key | None, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    state: PolicyState
    switched: bool
    reason: str  # "stay", "merge", "unmerge", "forced" (the merged version had to go)

    @property
    def merged(self) -> Key | None:
        return self.state.merged


def decide(
    state: PolicyState,
    mix: BatchMix,
    cost: CostModel,
    mergeable: Collection[Key],
    force_unmerge: bool = False,
) -> Decision:
    """The mode of the next step, from the current state and that step's batch.

    `mergeable`: versions that may be merged now (the engine leaves out a version while another version of the
    same adapter is in flight, and retired versions). `force_unmerge`: the merged version must go (retired and
    out of the batch), whatever the credits say. A merged version that stops being mergeable stays merged until
    the credits or `force_unmerge` say otherwise: its rows are served exactly either way."""
    current = state.merged
    if current is not None and force_unmerge:
        return Decision(PolicyState(None, {}), True, "forced")
    alternatives: list[Key | None] = [] if current is None else [None]
    top = mix.top(mergeable)
    if top is not None and top != current:
        alternatives.append(top)
    now = cost.step(mix, current)
    credits: dict[Key | None, float] = {}
    for alt in alternatives:
        credits[alt] = max(0.0, state.credits.get(alt, 0.0) + now - cost.step(mix, alt))
    if alternatives:
        best = max(alternatives, key=lambda a: credits[a])
        round_trip = cost.merge_s + cost.unmerge_s
        if credits[best] > 0.0 and credits[best] >= max(cost.switch(current, best), round_trip):
            return Decision(PolicyState(best, {}), True, "unmerge" if best is None else "merge")
    return Decision(PolicyState(current, credits), False, "stay")


PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def estimate_cost(shape, rank: int, cuda: bool, weight_bytes: int = 2) -> CostModel:
    """A first `CostModel` from the model's shape (`num_layers`, `proj_dims(proj)`), before any merge is timed.

    A pass moves `2·rank·(in+out)` flops per row and projection and reads each segment's A and B once. On CUDA
    (Triton kernels: skinny GEMMs at a fraction of peak, ~4 launches per projection group and pass, one adapter's
    weights per segment from HBM) and on CPU (the torch reference: one matmul pair per segment and projection,
    ~5 µs of dispatch each); a merge reads and writes every projection weight once and runs one B·A per projection.
    The engine replaces `merge_s` with the measured time of its merges (`engine/merge_switch.py`)."""
    dims = [shape.proj_dims(p) for p in PROJS]
    layers = shape.num_layers
    lora_flops = 2 * rank * sum(i + o for i, o in dims) * layers
    adapter_bytes = rank * sum(i + o for i, o in dims) * layers * weight_bytes
    merge_flops = 2 * rank * sum(i * o for i, o in dims) * layers
    weights = sum(i * o for i, o in dims) * layers * weight_bytes
    if cuda:
        return CostModel(
            row_s=lora_flops / 30e12,
            segment_s=adapter_bytes / 2e12,
            pass_s=4 * 4 * layers * 1e-6,
            merge_s=2 * weights / 2e12 + merge_flops / 200e12,
        )
    return CostModel(
        row_s=lora_flops / 20e9,
        segment_s=2 * len(PROJS) * layers * 5e-6,
        pass_s=0.0,
        merge_s=(2 * weights + 4 * weights) / 5e9 + merge_flops / 20e9,
    )
