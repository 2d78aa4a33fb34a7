"""Batched-LoRA contract (shrink/expand over padded slots and segments) and the contexts built on it.

The torch reference is checked against a per-token dense computation; the dense (training) context is checked to
be autograd-friendly with frozen base weights, and prefix K/V + capture reproduce a full forward exactly.
"""

from __future__ import annotations

import pytest
import torch
from lorafleet.worker.layers.attention import DenseAttentionContext
from lorafleet.worker.layers.lora_context import DenseLoRAContext, SegmentLoRAContext
from lorafleet.worker.lora import dispatch, ops


def _slots(ranks, fin, fout, max_rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(len(ranks), max_rank, fin)
    b = torch.zeros(len(ranks), fout, max_rank)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, fin, generator=g)
        b[s, :, :r] = torch.randn(fout, r, generator=g)
    return a, b


def test_shrink_expand_match_per_token_dense_with_mixed_ranks():
    fin, fout, max_rank = 24, 40, 16
    ranks = [4, 16, 8]
    a, b = _slots(ranks, fin, fout, max_rank)
    scales = torch.tensor([0.5, 2.0, 1.5])
    seg_indptr = torch.tensor([0, 3, 3, 7, 9, 12], dtype=torch.int32)  # includes an empty segment
    seg_slots = torch.tensor([1, 0, -1, 2, 1], dtype=torch.int32)
    x = torch.randn(12, fin)
    y0 = torch.randn(12, fout)
    assert dispatch.ops_for(x.device) is ops
    v = dispatch.lora_shrink(x, a, seg_indptr, seg_slots)
    assert v.dtype == torch.float32 and v.shape == (12, max_rank)
    y = dispatch.lora_expand(v, b, seg_indptr, seg_slots, scales, y0.clone())
    expect = y0.clone()
    per_token = [1, 1, 1, -1, -1, -1, -1, 2, 2, 1, 1, 1]
    for t, s in enumerate(per_token):
        if s >= 0:
            r = ranks[s]
            expect[t] += scales[s] * (x[t] @ a[s, :r].t()) @ b[s, :, :r].t()
    torch.testing.assert_close(y, expect, atol=1e-5, rtol=1e-5)
    assert not v[3:7].any()  # rows of the no-adapter segment stay zero


class _Slots:
    def __init__(self, a, b, scales):
        self.a, self.b, self.scales = a, b, scales

    def stacked(self, layer_idx, proj, always=False):
        return self.a, self.b


def test_segment_context_equals_dense_context_per_adapter():
    a, b = _slots([8, 4], 16, 16, 8, seed=1)
    scales = torch.tensor([2.0, 0.25])
    seg = SegmentLoRAContext(_Slots(a, b, scales), torch.tensor([0, 5, 9]), torch.tensor([1, 0]))
    x = torch.randn(9, 16)
    y = seg.apply(0, "q_proj", x, torch.zeros(9, 16))
    d1 = DenseLoRAContext({(0, "q_proj"): (a[1, :4], b[1, :, :4])}, 0.25).apply(0, "q_proj", x[:5], torch.zeros(5, 16))
    d0 = DenseLoRAContext({(0, "q_proj"): (a[0], b[0])}, 2.0).apply(0, "q_proj", x[5:], torch.zeros(4, 16))
    torch.testing.assert_close(y, torch.cat([d1, d0]), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def model(tiny_model):
    from lorafleet.worker.loader import load_model

    return load_model(tiny_model, torch.device("cpu"), torch.float32)[0]


def test_dense_lora_context_trains_only_adapter_params(model, adapters):
    from lorafleet.worker.lora.adapter import read_adapter

    w = read_adapter(adapters["ad-r8"], model.shape, 64)
    params = {k: (a.clone().requires_grad_(True), b.clone().requires_grad_(True)) for k, (a, b) in w.weights.items()}
    ids = torch.tensor([5, 9, 33, 120, 7, 8])
    hidden = model(
        ids[:-1], torch.arange(5), DenseAttentionContext(model.attn_scale), DenseLoRAContext(params, w.scale)
    )
    loss = torch.nn.functional.cross_entropy(model.compute_logits(hidden), ids[1:])
    loss.backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a, _ in params.values())
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for _, b in params.values())
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_prefix_kv_and_capture_reproduce_full_forward(model):
    ids = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79, 32, 38])
    ctx = DenseAttentionContext(model.attn_scale)
    full = model(ids, torch.arange(10), ctx)
    kv: dict[tuple[int, str], torch.Tensor] = {}
    sites = set()

    def capture(layer, site, t):
        sites.add(site)
        if site in ("k", "v"):
            kv[(layer, site)] = t.detach()

    model(ids[:6], torch.arange(6), ctx, capture=capture)
    assert sites == {"layer_in", "attn_in", "k", "v", "o_in", "mlp_in", "down_in", "final_in"}
    prefix = [(kv[(i, "k")], kv[(i, "v")]) for i in range(model.shape.num_layers)]
    tail = model(ids[6:], torch.arange(6, 10), DenseAttentionContext(model.attn_scale, prefix_kv=prefix))
    torch.testing.assert_close(tail, full[6:], atol=1e-5, rtol=1e-5)
    packed = model(torch.cat([ids[:4], ids]), torch.cat([torch.arange(4), torch.arange(10)]),
                   DenseAttentionContext(model.attn_scale, seq_lens=[4, 10]))  # fmt: skip
    torch.testing.assert_close(packed[4:], full, atol=1e-5, rtol=1e-5)


def test_fused_projections_equal_separate_ones(tiny_model, adapters):
    """The GPU serving layout (q|k|v and gate|up fused, grouped LoRA shrink/expand) computes the same function."""
    from lorafleet.worker.loader import load_model
    from lorafleet.worker.lora.adapter import read_adapter
    from lorafleet.worker.lora.store import AdapterStore

    sep = load_model(tiny_model, torch.device("cpu"), torch.float32)[0]
    fused = load_model(tiny_model, torch.device("cpu"), torch.float32)[0]
    fused.fuse_projections()
    assert (
        fused.model.layers[0].self_attn.q_proj.weight.data_ptr()
        == fused.model.layers[0].self_attn.fused.weight.data_ptr()
    )
    store = AdapterStore(
        sep.shape, torch.device("cpu"), torch.float32, max_slots=3, roots=[str(adapters["ad-r4"].parent)]
    )
    names = ["ad-r2qv", "ad-r16rs", "ad-r8"]
    slots = [store.ensure_slot(store.register(n, str(adapters[n]))) for n in names]
    ids = torch.tensor([5, 9, 33, 120, 7, 8, 77, 41, 300, 2])
    pos = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1, 2])
    ctx = DenseAttentionContext(sep.attn_scale, seq_lens=[4, 3, 3])
    seg = (torch.tensor([0, 4, 7, 10]), torch.tensor(slots))
    a = sep(ids, pos, ctx, SegmentLoRAContext(store, *seg))
    b = fused(ids, pos, ctx, SegmentLoRAContext(store, *seg))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    from lorafleet.worker.layers import lora_context

    old, lora_context.MAX_FUSED_SHRINK_RANK = lora_context.MAX_FUSED_SHRINK_RANK, 8  # force per-slice shrinks
    try:
        c = fused(ids, pos, ctx, SegmentLoRAContext(store, *seg))
    finally:
        lora_context.MAX_FUSED_SHRINK_RANK = old
    torch.testing.assert_close(c, b, atol=1e-5, rtol=1e-5)
    base = sep(ids, pos, ctx)
    assert (a - base).abs().max() > 1e-2
    w = read_adapter(adapters["ad-r8"], sep.shape, 64)
    params = {k: (x.clone().requires_grad_(True), y.clone().requires_grad_(True)) for k, (x, y) in w.weights.items()}
    out = fused(ids[:4], pos[:4], DenseAttentionContext(sep.attn_scale), DenseLoRAContext(params, w.scale))
    ref = sep(ids[:4], pos[:4], DenseAttentionContext(sep.attn_scale), DenseLoRAContext(params, w.scale))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert all(x.grad is not None and y.grad is not None for x, y in params.values())
