"""Log-probabilities of the sampled tokens and of the k most likely ones, from the logits the sampler was given.

Why from the sampler's input: those are the model's logits after every LoRA, before penalties, temperature, top-k/p
and min_tokens masking, which is vLLM's default (`logprobs_mode="raw_logprobs"`) and what a reference model's
`log_softmax` gives. They are computed in float32 on the device in the same sampling call, for the rows that asked
only, and copied to the host on a side stream (like the sampled tokens), so async scheduling keeps its overlap.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs


@dataclass(frozen=True)
class TokenLogprob:
    """One output token's log-probability and the `top` most likely tokens at its position, (id, logprob) by
    descending logprob (ties by lower id first: torch.topk's order on CPU and CUDA alike is not promised, so the
    host re-sorts)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class StepLogprobs:
    """The logprobs of one sampling call's rows that asked for them, on the device until `host()`."""

    def __init__(
        self, rows: list[int], ks: list[int], sampled: torch.Tensor, top_vals: torch.Tensor, top_ids: torch.Tensor
    ) -> None:
        self.rows = rows
        self.ks = ks
        self._tensors = [sampled, top_vals, top_ids]
        self._event = None
        if sampled.device.type == "cuda":
            stream = _copy_stream(sampled.device)
            stream.wait_stream(torch.cuda.current_stream(sampled.device))
            with torch.cuda.stream(stream):
                host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in self._tensors]
                for h, t in zip(host, self._tensors, strict=True):
                    h.copy_(t, non_blocking=True)
                    t.record_stream(stream)
                self._event = torch.cuda.Event()
                self._event.record(stream)
            self._tensors = host
        self._host: dict[int, TokenLogprob] | None = None

    def host(self) -> dict[int, TokenLogprob]:
        """Row of the sampling call -> its entry (waits for the copy, not for work queued after it)."""
        if self._host is None:
            if self._event is not None:
                self._event.synchronize()
            sampled, vals, ids = (t.tolist() for t in self._tensors)
            out = {}
            for j, row in enumerate(self.rows):
                k = self.ks[j]
                top = sorted(zip(ids[j][:k], vals[j][:k], strict=True), key=lambda x: (-x[1], x[0]))
                out[row] = TokenLogprob(int(sampled[j][0]), float(sampled[j][1]), tuple(top))
            self._host = out
        return self._host


@functools.cache
def _copy_stream(device: torch.device):
    return torch.cuda.Stream(device=device)


def step_logprobs(logits: torch.Tensor, ks: list[int | None], tokens: torch.Tensor) -> StepLogprobs | None:
    """`logits` [N, V] as the sampler got them, `ks[i]` the top-k wanted for row i (None: no logprobs), `tokens` [N]
    the sampled ids on the device. None when no row asked."""
    rows = [i for i, k in enumerate(ks) if k is not None]
    if not rows:
        return None
    dev = logits.device
    idx = torch.tensor(rows, device=dev) if len(rows) < logits.shape[0] else None
    sel = logits if idx is None else logits.index_select(0, idx)
    logp = torch.log_softmax(sel.float(), dim=-1)
    picked = tokens if idx is None else tokens.index_select(0, idx)
    # [R, 2] float64: (token id, its logprob); float64 holds every id exactly
    sampled = torch.stack([picked.double(), logp.gather(1, picked[:, None]).squeeze(1).double()], dim=1)
    k = max(int(ks[i] or 0) for i in rows)
    if k:
        top_vals, top_ids = logp.topk(k, dim=-1)
    else:
        top_vals = torch.empty(len(rows), 0, dtype=torch.float32, device=dev)
        top_ids = torch.empty(len(rows), 0, dtype=torch.long, device=dev)
    return StepLogprobs(rows, [int(ks[i] or 0) for i in rows], sampled, top_vals, top_ids)
