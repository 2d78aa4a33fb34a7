"""Layer-split training pieces as plain CUDA-graph replays: no autograd on the launch path (`piece_launch="raw"`).

Why: co-serving fills the GPU's idle gaps between host-bound serving steps, and one-layer pieces fit those gaps
best, but each piece also costs the serving loop's own thread host time while it is launched. Through
`torch.cuda.make_graphed_callables` a piece is an autograd call: the forward is an `autograd.Function`, the
backward goes through the autograd engine and AccumulateGrad. On an H200 that was ~170-250 us of host time per
one-layer piece, 1.4-5 ms per serving iteration of a 1B model (bench/results/cl_gpu_s9_pieces.json,
`hook_us_per_iteration`). Here a piece is one `graph.replay()`:
- the forward graph of segment i reads segment i-1's static output in place (its input is a detached view of it),
  and the head graph runs the head's forward and backward;
- the backward graph of segment i reads the next piece's static input gradient in place and adds its LoRA gradients
  into the trainer's accumulators inside the graph (no `.grad`, no AccumulateGrad).
The capture recipe is make_graphed_callables': forward graphs in order, then backward graphs in reverse order, all in
one memory pool, after eager warm-up runs with zero row weights (which add exact zeros to the accumulators). A
backward capture may release the saved tensors of its own segment, whose memory a later (lower) backward capture can
reuse; at replay time that lower backward runs after this one, so nothing it overwrites is still needed.

With graphs off (CPU, or a bucket beyond the trainer's graph limit) the same pieces run eagerly with the same
chaining, which is what the CPU tests compare against `LoRATrainer`. Opt-in: the default stays the autograd path
until this one has been measured on a GPU (`bench/cl_gpu.py --graph-launch raw`).
"""

from __future__ import annotations

import torch
from torch import nn


class RawPieces:
    """The pieces of one bucket: forward segments 0..n-1, the head, backward segments n-1..0 (the trainer's order)."""

    def __init__(self, gt, st, segs: list[nn.Module], head: nn.Module, capture: bool, stream=None, pool=None) -> None:
        self.gt, self.st = gt, st
        self.segs, self.head = segs, head
        self.n = len(segs)
        acc_of = {id(p): a for p, a in zip(gt.params, gt.acc, strict=True)}
        self.params = [list(s.lora) for s in segs]
        self.accs = [[acc_of[id(p)] for p in ps] for ps in self.params]
        self.ins: list[torch.Tensor | None] = [None] * self.n
        self.outs: list[torch.Tensor | None] = [None] * self.n
        self.gin: list[torch.Tensor | None] = [None] * (self.n + 1)  # gin[i]: d loss / d (input of segment i)
        self.graphs: list[torch.cuda.CUDAGraph] | None = None
        if capture:
            self._capture(stream, pool)

    @property
    def captured(self) -> bool:
        return self.graphs is not None

    def run(self, i: int) -> None:
        """Piece i of the micro-batch whose inputs are in the bucket's buffers (0 <= i <= 2n)."""
        if self.graphs is not None:
            self.graphs[i].replay()
        elif i < self.n:
            self._forward(i)
        elif i == self.n:
            self._head()
        else:
            j = 2 * self.n - i
            self._backward(j)
            self.ins[j] = self.outs[j] = self.gin[j + 1] = None  # eager: this segment's autograd state is done

    # ---- the pieces, eagerly (also what a capture records) ----
    def _forward(self, i: int) -> None:
        if i == 0:
            x = self.gt.t.model.model.embed_tokens(self.st.ids)  # frozen: no gradient wanted below segment 0
        else:
            x = self.outs[i - 1].detach().requires_grad_(True)  # type: ignore[union-attr]
        self.ins[i] = x
        self.outs[i] = self.segs[i](x)

    def _head(self) -> None:
        x = self.outs[self.n - 1].detach().requires_grad_(True)  # type: ignore[union-attr]
        (self.gin[self.n],) = torch.autograd.grad(self.head(x), (x,))

    def _backward(self, j: int) -> None:
        x = self.ins[j]
        want_x = bool(x.requires_grad)  # type: ignore[union-attr]
        wrt = ([x] if want_x else []) + self.params[j]
        grads = torch.autograd.grad(self.outs[j], wrt, grad_outputs=self.gin[j + 1], allow_unused=True)
        if want_x:
            self.gin[j], grads = grads[0], grads[1:]
        pairs = [(a, g) for a, g in zip(self.accs[j], grads, strict=True) if g is not None]
        if pairs:
            torch._foreach_add_([a for a, _ in pairs], [g for _, g in pairs])

    # ---- capture ----
    def _capture(self, stream, pool) -> None:
        st = self.st
        saved = st.row_w.clone()
        st.row_w.zero_()  # warm-up and capture runs: zero-weight rows add exact zeros to the accumulators
        try:
            for _ in range(2):  # lazy inits, cuBLAS workspaces, autotuning, outside any capture
                for i in range(2 * self.n + 1):
                    self.run(i)
            graphs = [torch.cuda.CUDAGraph() for _ in range(2 * self.n + 1)]
            for i in range(self.n):  # forwards in order
                with torch.cuda.graph(graphs[i], pool=pool, stream=stream):
                    self._forward(i)
            with torch.cuda.graph(graphs[self.n], pool=pool, stream=stream):  # the head: forward and backward
                self._head()
            for j in reversed(range(self.n)):  # backwards top first, each reading the gradient captured above it
                with torch.cuda.graph(graphs[2 * self.n - j], pool=pool, stream=stream):
                    self._backward(j)
            self.graphs = graphs
        finally:
            st.row_w.copy_(saved)
