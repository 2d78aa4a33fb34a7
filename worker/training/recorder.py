"""Records the prompt K/V of served requests whose adapter has a recording job, right after their prefill step.

Why from the paged KV cache, after the step's forward is queued: the serving forward already wrote every prompt
token's rotated K/V into the cache (that is what the stash keeps, see stash.py), so recording needs no hook inside
the forward. The forward stays a replayable CUDA graph (a per-layer callback cannot run inside one), and the host
work of recording (one gather per layer for all recorded sequences, then the stash's side-stream copies) happens
while the GPU computes the step. Copies are ordered after the step on the stash's stream, so they read the K/V the
step wrote. The recorder maps each recorded sequence to its rows of the flat (adapter-sorted) batch once per step;
only prompt tokens are recorded (a re-prefill after preemption that covers generated tokens is clipped).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from lorafleet.worker.training.stash import ActivationStash

log = logging.getLogger(__name__)

# adapter name -> (stash, version -> optimizer step of that version) or None when not recording
Lookup = Callable[[str], tuple[ActivationStash, Callable[[str | None], int]] | None]
# called with the runner's per-layer (k_cache, v_cache) and the step's slot mapping, after the forward is queued
Record = Callable[[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor], None]


class PrefillRecorder:
    def __init__(self, lookup: Lookup, num_layers: int) -> None:
        self.lookup = lookup
        self.num_layers = num_layers

    def __call__(self, batch, inp) -> Record | None:
        spans = []
        row = 0
        for i in inp.order:
            seq, n = batch.seqs[i], batch.num_tokens[i]
            start = seq.num_computed_tokens
            ad = seq.adapter
            if ad is not None and start < seq.num_prompt_tokens:
                hit = self.lookup(ad.name)
                if hit is not None:
                    stash, version_step = hit
                    take = min(n, seq.num_prompt_tokens - start)
                    if start == 0:
                        stash.begin(seq.request_id, ad.name, 0, version_step(ad.version), self.num_layers)
                    done = start + take == seq.num_prompt_tokens
                    spans.append((stash, seq, row, row + take, done))
            row += n
        if not spans:
            return None

        def record(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], slot_mapping: torch.Tensor) -> None:
            try:
                _record(kv_caches, slot_mapping)
            except Exception:  # noqa: BLE001 - recording must never fail a serving step
                log.exception("activation recording failed; dropping this step's recordings")
                for stash, seq, *_ in spans:
                    stash.abort(seq.request_id)

        def _record(kv_caches, slot_mapping) -> None:
            rows = torch.cat([slot_mapping[lo:hi] for _, _, lo, hi, _ in spans])
            offsets = [0]
            for _, _, lo, hi, _ in spans:
                offsets.append(offsets[-1] + hi - lo)
            last = self.num_layers - 1
            for layer, (kc, vc) in enumerate(kv_caches):
                k = kc.flatten(0, 1).index_select(0, rows)  # [n, Hk, D]: this step's prompt tokens, all spans
                v = vc.flatten(0, 1).index_select(0, rows)
                for j, (stash, seq, _lo, _hi, done) in enumerate(spans):
                    a, b = offsets[j], offsets[j + 1]
                    ok = stash.add(seq.request_id, layer, k[a:b], v[a:b])
                    if ok and done and layer == last:
                        stash.finish(seq.request_id, seq.token_ids[: seq.num_prompt_tokens])

        return record
