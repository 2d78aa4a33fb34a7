"""CUDA graphs for decode steps: capture once per batch size, replay with the live batch padded to the next size.

Why: a decode step of a 32-layer model with unmerged LoRA is ~500 small kernels; launched from Python they cost
more than the math at small batch. A captured graph replays them with almost no CPU time. Graphs bake in tensor
addresses and shapes, so every input lives in a static buffer sized for the captured batch and the live batch is
copied into its head; the tail is filled with a padding value chosen so that padded rows do no harm:
- token ids / positions: 0; slot mapping (where K/V are written): a dedicated scratch slot;
- `seq_lens`: 0, so `paged_attention` writes zeros for those rows and reads no block;
- `seg_indptr` ("edge"): repeated last boundary, i.e. empty segments, and `seg_slots`: -1 (no adapter), so the
  Triton LoRA kernels (which need no host-side segment sizes) skip the padded rows.
The runner is model-agnostic: `fn(inputs) -> Tensor` is any callable whose tensors' first dimension scales with
the batch (`+ extra` rows, e.g. `seg_indptr` has batch + 1). Graphs share one memory pool, captured largest first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

EDGE = "edge"


@dataclass(frozen=True)
class InputSpec:
    """How one input is laid out: `extra` rows beyond the batch size, and what fills the padded tail."""

    name: str
    extra: int = 0
    pad: float | int | str = 0


class CudaGraphRunner:
    """Captures `fn` for each batch size in `sizes`; `__call__` pads to the smallest size >= the live batch."""

    def __init__(
        self,
        fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        specs: Sequence[InputSpec],
        sizes: Sequence[int],
        example: Callable[[int], dict[str, torch.Tensor]],
        warmup: int = 2,
    ) -> None:
        """`example(bs)` returns valid inputs for batch `bs` (used to allocate buffers and to warm up, which also
        compiles Triton kernels outside the capture)."""
        self.fn = fn
        self.specs = {s.name: s for s in specs}
        self.sizes = sorted(set(int(s) for s in sizes))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.static_in: dict[int, dict[str, torch.Tensor]] = {}
        self.static_out: dict[int, torch.Tensor] = {}
        self.pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):
            inputs = {k: v.clone() for k, v in example(bs).items()}
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    fn(inputs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = fn(inputs)
            self.graphs[bs] = graph
            self.static_in[bs] = inputs
            self.static_out[bs] = out
        torch.cuda.synchronize()

    def size_for(self, batch: int) -> int | None:
        """Smallest captured size that holds `batch`, or None (the caller runs eagerly)."""
        for s in self.sizes:
            if s >= batch:
                return s
        return None

    def __call__(self, inputs: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
        """Copy the live inputs into the static buffers of the chosen graph, pad, replay; returns the first
        `batch` rows of the static output (a view: consume or copy it before the next replay)."""
        bs = self.size_for(batch)
        if bs is None:
            return self.fn(inputs)[:batch]
        _fill(self.static_in[bs], inputs, self.specs)
        self.graphs[bs].replay()
        return self.static_out[bs][:batch]


def _fill(static: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], specs: dict[str, InputSpec]) -> None:
    """Copies live inputs into the head of their static buffers and pads the tail as each spec says."""
    for name, buf in static.items():
        spec = specs.get(name, InputSpec(name))
        src = inputs[name]
        n = src.shape[0]
        buf[:n].copy_(src, non_blocking=True)
        if n < buf.shape[0]:
            if spec.pad == EDGE:
                buf[n:].copy_(src[n - 1 : n].expand_as(buf[n:]), non_blocking=True)
            else:
                buf[n:].fill_(spec.pad)


class MixedGraphRunner:
    """CUDA graphs for steps with prefill tokens (chunked prefill mixed with decodes).

    Why: such a step is launched eagerly otherwise, and on a fast GPU its ~500 kernel launches take longer than its
    math (a 1B step with one 256-token prefill: ~14 ms of launches on an H100), so the GPU mostly waits and co-served
    training cannot use the gaps without delaying the trickle of serving kernels. Keys are (token bucket T, query
    bucket Q): token-axis inputs are padded to T (padded tokens belong to no sequence and no LoRA segment and write
    their K/V to the scratch slot), sequence-axis inputs to `max_seqs` (padded sequences have no query tokens), and
    `fn(inputs, Q)` is captured with Q as the longest query (the attention grid depends on it; rows beyond a
    sequence's own query length are masked, so a larger Q gives the same numbers). Returns the hidden states of the
    first `num_tokens` rows."""

    def __init__(
        self,
        fn: Callable[[dict[str, torch.Tensor], int], torch.Tensor],
        specs: Sequence[InputSpec],
        buckets: dict[int, list[int]],
        max_seqs: int,
        example: Callable[[int, int], dict[str, torch.Tensor]],
        pool=None,
    ) -> None:
        """`buckets`: token bucket -> its query buckets; `example(T, S)`: valid inputs with T tokens, S sequences."""
        self.specs = {s.name: s for s in specs}
        self.max_seqs = max_seqs
        self.buckets = {t: sorted(qs) for t, qs in sorted(buckets.items())}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        # inputs and output are shared by the graphs of one token bucket (one step runs at a time). The output is
        # a buffer outside the pool that each graph copies its result into: the forward's own output is then a
        # temporary the pool reuses, instead of one live [T, hidden] tensor per captured (T, Q) pair.
        self.static_in: dict[int, dict[str, torch.Tensor]] = {}
        self.static_out: dict[int, torch.Tensor] = {}
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.replays = 0
        for t in sorted(self.buckets, reverse=True):
            inputs = {k: v.clone() for k, v in example(t, max_seqs).items()}
            self.static_in[t] = inputs
            for q in sorted(self.buckets[t], reverse=True):
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    warm = fn(inputs, q)  # warm-up: Triton compiles outside the capture
                torch.cuda.current_stream().wait_stream(stream)
                if t not in self.static_out:
                    self.static_out[t] = torch.empty_like(warm)
                del warm
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.static_out[t].copy_(fn(inputs, q))
                self.graphs[(t, q)] = graph
        torch.cuda.synchronize()

    def key_for(self, num_tokens: int, num_seqs: int, max_q_len: int) -> tuple[int, int] | None:
        """The smallest captured (T, Q) that holds the step, or None (the caller runs eagerly)."""
        return mixed_key(self.buckets, self.max_seqs, num_tokens, num_seqs, max_q_len)

    def __call__(self, inputs: dict[str, torch.Tensor], key: tuple[int, int], num_tokens: int) -> torch.Tensor:
        _fill(self.static_in[key[0]], inputs, self.specs)
        self.graphs[key].replay()
        self.replays += 1
        return self.static_out[key[0]][:num_tokens]


def mixed_key(
    buckets: dict[int, list[int]], max_seqs: int, num_tokens: int, num_seqs: int, max_q_len: int
) -> tuple[int, int] | None:
    """The smallest (T, Q) of `buckets` (sorted by T) with T >= the step's tokens and Q >= its longest query."""
    if num_seqs > max_seqs:
        return None
    for t, qs in buckets.items():
        if t >= num_tokens:
            for q in qs:
                if q >= max_q_len:
                    return t, q
    return None


def mixed_buckets(max_tokens: int, query_buckets: Sequence[int] = (32, 128, 512, 2048)) -> dict[int, list[int]]:
    """Token buckets 128, 256, 384, 512, then steps of a half power of two (768, 1024, 1536, ...) up to max_tokens
    (and max_tokens itself): padding costs at most ~1/3 of a step's tokens beyond the smallest bucket. Each token
    bucket gets the query buckets below it plus T, so a long query never shares a graph sized for short ones."""
    tokens, t = [128, 256, 384, 512], 512
    while t < max_tokens:
        tokens += [t * 3 // 2, t * 2]
        t *= 2
    tokens = sorted({x for x in tokens if x < max_tokens} | {max_tokens})
    return {t: sorted({min(q, t) for q in query_buckets} | {t}) for t in tokens}


def default_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, then steps of 8 to 128, 16 to 256, 32 beyond: padding wastes at most 1/8 of a large batch."""
    sizes = [1, 2, 4]
    sizes += list(range(8, min(128, max_batch) + 1, 8))
    sizes += list(range(144, min(256, max_batch) + 1, 16))
    sizes += list(range(288, max_batch + 1, 32))
    sizes = sorted(s for s in set(sizes) if s <= max_batch)
    if not sizes or sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes
