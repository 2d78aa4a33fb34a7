"""Token sampling: greedy at temperature 0, else temperature → top-k → top-p → a draw; logprobs on request.

Why the exponential race (argmax p/q, q ~ Exp(1)): it is an exact categorical draw that needs one noise vector per
row, so a request with a `seed` draws from its own torch.Generator and gets the same tokens whatever batch it
lands in, while unseeded rows share one batched draw. Rows whose request asked for logprobs get them from the logits
this call was given (logprobs.py); they wait in `last_logprobs` until the engine takes them after the step.
"""

from __future__ import annotations

import torch
from lorafleet.worker.engine.logprobs import StepLogprobs, step_logprobs
from lorafleet.worker.engine.sequence import SamplingParams


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.last_logprobs: StepLogprobs | None = None  # of the latest call; the engine takes it (`take_logprobs`)

    def take_logprobs(self) -> StepLogprobs | None:
        """The logprobs of the latest call (None if no row asked), once: a later call never sees them."""
        out, self.last_logprobs = self.last_logprobs, None
        return out

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        histories: list[tuple[list[int], list[int]]] | None = None,  # (prompt ids, output ids) per row
    ) -> list[int]:
        """logits: [N, V] float32 → one token id per row."""
        return self.sample(logits, params, generators, histories).tolist()

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        histories: list[tuple[list[int], list[int]]] | None = None,
        non_blocking: bool = False,
    ) -> torch.Tensor:
        """Like `__call__` but the tokens stay on the device ([N] long), so the next step can read them before the
        host does (async scheduling). `non_blocking` uploads the per-row knobs from pinned memory: a plain
        host->device copy waits for the whole queue, which would stall the host on the step in flight."""
        out = self._sample(logits, params, generators, histories, non_blocking)
        ks = [p.logprobs for p in params]
        self.last_logprobs = step_logprobs(logits, ks, out) if any(k is not None for k in ks) else None
        return out

    def _sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        histories: list[tuple[list[int], list[int]]] | None,
        non_blocking: bool,
    ) -> torch.Tensor:
        if histories is not None and any(p.has_penalties for p in params):
            logits = apply_penalties(logits, params, histories)
        greedy = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if p.temperature > 0]
        if not rows:
            return greedy
        dev = logits.device
        idx = to_device(torch.tensor(rows), dev, non_blocking)
        vocab = logits.shape[-1]
        knobs = torch.tensor(  # one host->device build for the three per-row knobs
            [[params[i].temperature, params[i].top_k if params[i].top_k > 0 else vocab, params[i].top_p] for i in rows],
            dtype=torch.float64,
        )
        knobs = to_device(knobs, dev, non_blocking)
        temps, ks, top_ps = knobs[:, 0].float(), knobs[:, 1].long(), knobs[:, 2].float()
        scaled = logits[idx] / temps[:, None]
        if all(params[i].top_k <= 0 or params[i].top_k >= vocab for i in rows) and all(
            params[i].top_p >= 1.0 for i in rows
        ):
            sorted_logits, sorted_ids = scaled, None  # plain temperature sampling: no need to sort the vocab
        else:
            sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
            rank = torch.arange(vocab, device=logits.device)[None, :]
            sorted_logits = sorted_logits.masked_fill(rank >= ks[:, None], float("-inf"))
            if any(params[i].top_p < 1.0 for i in rows):
                probs = sorted_logits.softmax(dim=-1)
                before = probs.cumsum(dim=-1) - probs  # mass strictly before each token; keep tokens while < top_p
                sorted_logits = sorted_logits.masked_fill(before >= top_ps[:, None], float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        shared = [j for j, i in enumerate(rows) if generators[i] is None]
        if len(shared) == len(rows):  # no per-request generators: one draw, no scatter
            noise = torch.empty_like(probs).exponential_(generator=self.generator)
        else:
            noise = torch.empty_like(probs)
            if shared:
                noise[to_device(torch.tensor(shared), dev, non_blocking)] = torch.empty(
                    len(shared), vocab, device=logits.device
                ).exponential_(generator=self.generator)
            for j, i in enumerate(rows):
                g = generators[i]
                if g is not None:
                    noise[j].exponential_(generator=g)
        choice = (probs / noise).argmax(dim=-1, keepdim=True)
        picked = choice.squeeze(1) if sorted_ids is None else sorted_ids.gather(1, choice).squeeze(1)
        out = greedy.clone()
        out[idx] = picked
        return out


def to_device(t: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    """Host tensor -> device. With `non_blocking` on CUDA it goes through pinned memory with an async copy (the
    caching host allocator keeps the pinned block until the copy is done); a pageable copy syncs the stream."""
    if non_blocking and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def apply_penalties(
    logits: torch.Tensor, params: list[SamplingParams], histories: list[tuple[list[int], list[int]]]
) -> torch.Tensor:
    """Presence/frequency penalties over the output (OpenAI) and the repetition penalty over prompt + output
    (HF), applied before greedy or sampled selection, as vLLM does; and vLLM's min_tokens: while the output is
    shorter than `min_tokens`, the stop tokens (EOS unless ignored, `stop_token_ids`) cannot be drawn. Rows without
    any of these are untouched."""
    logits = logits.clone()
    vocab = logits.shape[1]
    for i, (p, (prompt, output)) in enumerate(zip(params, histories, strict=True)):
        if not p.has_penalties:
            continue
        row = logits[i]
        if len(output) < p.min_tokens and p.min_tokens_stop_ids:
            stop = [t for t in p.min_tokens_stop_ids if 0 <= t < vocab]
            row[torch.tensor(stop, dtype=torch.long, device=logits.device)] = float("-inf")
        out = torch.tensor(output, dtype=torch.long, device=logits.device)
        out = out[(out >= 0) & (out < vocab)]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(prompt + output, dtype=torch.long, device=logits.device)
            seen = seen[(seen >= 0) & (seen < vocab)].unique()
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if out.numel() and (p.frequency_penalty or p.presence_penalty):
            counts = torch.bincount(out, minlength=vocab).to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits
