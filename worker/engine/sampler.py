"""Token sampling: greedy at temperature 0, else temperature → top-k → top-p → a draw.

Why the exponential race (argmax p/q, q ~ Exp(1)): it is an exact categorical draw that needs one noise vector per
row, so a request with a `seed` draws from its own torch.Generator and gets the same tokens whatever batch it
lands in, while unseeded rows share one batched draw.
"""

from __future__ import annotations

import torch
from lorafleet.worker.engine.sequence import SamplingParams


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> list[int]:
        """logits: [N, V] float32 → one token id per row."""
        greedy = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if p.temperature > 0]
        if not rows:
            return greedy.tolist()
        idx = torch.tensor(rows, device=logits.device)
        temps = torch.tensor([params[i].temperature for i in rows], device=logits.device, dtype=torch.float32)
        scaled = logits[idx] / temps[:, None]
        sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
        vocab = scaled.shape[-1]
        ks = torch.tensor([params[i].top_k if params[i].top_k > 0 else vocab for i in rows], device=logits.device)
        rank = torch.arange(vocab, device=logits.device)[None, :]
        sorted_logits = sorted_logits.masked_fill(rank >= ks[:, None], float("-inf"))
        top_ps = torch.tensor([params[i].top_p for i in rows], device=logits.device, dtype=torch.float32)
        if (top_ps < 1.0).any():
            probs = sorted_logits.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass strictly before each token; keep tokens while < top_p
            sorted_logits = sorted_logits.masked_fill(before >= top_ps[:, None], float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        noise = torch.empty_like(probs)
        shared = [j for j, i in enumerate(rows) if generators[i] is None]
        if shared:
            noise[shared] = torch.empty(len(shared), vocab, device=logits.device).exponential_(generator=self.generator)
        for j, i in enumerate(rows):
            g = generators[i]
            if g is not None:
                noise[j].exponential_(generator=g)
        choice = (probs / noise).argmax(dim=-1, keepdim=True)
        picked = sorted_ids.gather(1, choice).squeeze(1)
        out = greedy.clone()
        out[idx] = picked
        return out.tolist()
