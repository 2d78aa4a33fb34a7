"""Builds the model `capture` of a serving step that records prefill K/V of adapters with a recording job.

Why per step: the capture callback only sees whole-batch tensors, so the recorder maps each recorded sequence to
its rows of the flat (adapter-sorted) batch once per step, then slices K/V per layer as the forward produces them,
copying into the stash arena in forward order. Only prompt tokens are recorded (a re-prefill after preemption that
covers generated tokens is clipped to the prompt).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from lorafleet.worker.training.stash import ActivationStash

log = logging.getLogger(__name__)

# adapter name -> (stash, version -> optimizer step of that version) or None when not recording
Lookup = Callable[[str], tuple[ActivationStash, Callable[[str | None], int]] | None]


class PrefillRecorder:
    def __init__(self, lookup: Lookup, num_layers: int) -> None:
        self.lookup = lookup
        self.num_layers = num_layers

    def __call__(self, batch, inp) -> Callable[[int, str, torch.Tensor], None] | None:
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
        pending: dict[int, torch.Tensor] = {}
        last = self.num_layers - 1

        def capture(layer: int, site: str, t: torch.Tensor) -> None:
            try:
                _capture(layer, site, t)
            except Exception:  # noqa: BLE001 - recording must never fail a serving step
                log.exception("activation recording failed; dropping this step's recordings")
                for stash, seq, *_ in spans:
                    stash.abort(seq.request_id)
                spans.clear()

        def _capture(layer: int, site: str, t: torch.Tensor) -> None:
            if site == "k":
                pending[layer] = t
            elif site == "v":
                k = pending.pop(layer)
                for stash, seq, lo, hi, done in spans:
                    ok = stash.add(seq.request_id, layer, k[lo:hi], t[lo:hi])
                    if ok and done and layer == last:
                        stash.finish(seq.request_id, seq.token_ids[: seq.num_prompt_tokens])

        return capture
