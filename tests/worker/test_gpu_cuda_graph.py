"""CUDA-graph decode runner: a captured step (paged attention + Triton LoRA shrink/expand) replayed with a smaller
live batch padded by the runner's rules gives the same rows as the eager step, and padded rows touch nothing.
GPU-only (skips on CPU), except the size-ladder check."""

from __future__ import annotations

import pytest
import torch
from lorafleet.worker.engine.cuda_graph import EDGE, CudaGraphRunner, InputSpec, default_sizes


def test_default_sizes_cover_every_batch() -> None:
    sizes = default_sizes(256)
    assert sizes[0] == 1 and sizes[-1] == 256 and sizes == sorted(set(sizes))
    for b in range(1, 257):
        pad = min(s for s in sizes if s >= b)
        assert pad - b <= max(7, b // 8)  # padding waste: < 8 rows, or at most 1/8 of a large batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replay_with_padding_matches_eager() -> None:
    from lorafleet.worker.layers.triton_attention import paged_attention
    from lorafleet.worker.lora import ops, triton_ops

    torch.manual_seed(0)
    dev = "cuda"
    h, hkv, d, page, nb, s, r = 8, 2, 64, 16, 128, 4, 16
    hid = h * d
    kc = torch.randn(nb, page, hkv, d, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    a = torch.randn(s, r, hid, device=dev, dtype=torch.bfloat16) / hid**0.5
    b = torch.randn(s, hid, r, device=dev, dtype=torch.bfloat16) * 0.1
    sc = torch.rand(s, device=dev) + 0.5
    maxb = 8

    def step(inp: dict[str, torch.Tensor]) -> torch.Tensor:
        n = inp["q"].shape[0]
        o = paged_attention(inp["q"], kc, vc, inp["block_table"], inp["seq_lens"], inp["q_indptr"], 1)
        y = o.reshape(n, hid).clone()
        v = triton_ops.lora_shrink(o.reshape(n, hid), a, inp["seg_indptr"], inp["seg_slots"])
        triton_ops.lora_expand(v, b, inp["seg_indptr"], inp["seg_slots"], sc, y)
        return y

    def make(bs: int, slots: list[int]) -> dict[str, torch.Tensor]:
        ss_t, counts = torch.unique_consecutive(torch.tensor(sorted(slots)), return_counts=True)
        ind, ss = [0] + counts.cumsum(0).tolist(), ss_t.tolist()
        return {
            "q": torch.randn(bs, h, d, device=dev, dtype=torch.bfloat16),
            "block_table": torch.randint(1, nb, (bs, maxb), device=dev, dtype=torch.int32),
            "seq_lens": torch.randint(1, maxb * page, (bs,), device=dev, dtype=torch.int32),
            "q_indptr": torch.arange(bs + 1, device=dev, dtype=torch.int32),
            "seg_indptr": torch.tensor(ind, device=dev, dtype=torch.int32),
            "seg_slots": torch.tensor(ss, device=dev, dtype=torch.int32),
        }

    specs = [
        InputSpec("q", 0, 0),
        InputSpec("block_table", 0, 0),
        InputSpec("seq_lens", 0, 0),
        InputSpec("q_indptr", 1, EDGE),
        InputSpec("seg_indptr", 1, EDGE),
        InputSpec("seg_slots", 0, -1),
    ]

    def example(bs: int) -> dict[str, torch.Tensor]:
        x = make(bs, [i % s for i in range(bs)])
        x["seg_indptr"] = torch.cat([x["seg_indptr"], x["seg_indptr"][-1:].expand(bs + 1 - len(x["seg_indptr"]))])
        x["seg_slots"] = torch.cat([x["seg_slots"], x["seg_slots"].new_full((bs - len(x["seg_slots"]),), -1)])
        return x

    runner = CudaGraphRunner(step, specs, [8, 32], example)
    for live, slots in ((5, [3, 0, 0, -1, 2]), (8, [1] * 8), (20, [i % 3 for i in range(20)]), (1, [-1])):
        inp = make(live, slots)
        eager = step(inp)
        got = runner(inp, live).clone()
        assert runner.size_for(live) in (8, 32)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), eager.float(), rtol=2e-2, atol=2e-2)
        # against the torch reference path too
        o_ref = paged_attention(inp["q"], kc, vc, inp["block_table"], inp["seq_lens"], inp["q_indptr"], 1)
        y_ref = o_ref.reshape(live, hid).float().clone()
        v_ref = ops.lora_shrink(o_ref.reshape(live, hid).float(), a.float(), inp["seg_indptr"], inp["seg_slots"])
        ops.lora_expand(v_ref, b.float(), inp["seg_indptr"], inp["seg_slots"], sc, y_ref)
        torch.testing.assert_close(got.float(), y_ref, rtol=3e-2, atol=3e-2)
    # a batch larger than every graph falls back to eager
    big = make(40, [0] * 40)
    torch.testing.assert_close(runner(big, 40).float(), step(big).float(), rtol=2e-2, atol=2e-2)
