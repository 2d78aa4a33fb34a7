"""The serving forward's fused Triton kernels (RMSNorm + residual add, rotary, SiLU-and-mul) against the torch layers.

On CPU they run under Triton's interpreter in a subprocess (as test_triton_ops.py does), in fp32 (on a GPU also
bf16: the interpreter truncates fp32 to bf16 where compiled code rounds to nearest), on
strided views like the ones the model hands them (the halves of a fused gate|up output, q/k inside q|k|v). The
kernels round wherever torch's ops round, so bf16 outputs must be bit-equal to the torch path except for rare one-ulp
differences from the fp32 sum of squares / exp; the assertions count those. A whole tiny Llama forward with the
kernels switched on must give the logits of the torch path, and autograd forwards must keep the torch layers.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def _ulp_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """(fraction of elements that differ at all, largest difference in units of the last place of bf16/fp32)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.isfinite(a).all()
    itype = torch.int16 if a.dtype in (torch.bfloat16, torch.float16) else torch.int32
    ai, bi = a.contiguous().view(itype).long(), b.contiguous().view(itype).long()
    differ = (ai != bi).float().mean().item()
    return differ, int((ai - bi).abs().max().item()) if a.numel() else 0


def _close(o: torch.Tensor, r: torch.Tensor, what: tuple, ulps_max: int = 1) -> None:
    """fp32: the sum of squares' order and rsqrt move the last bits, so a relative bound; bf16: those fp32 bits
    rarely survive the rounding, so at most `ulps_max` ulps on at most 1% of the elements."""
    if o.dtype == torch.float32:
        assert (o - r).abs().max().item() <= 1e-5 * r.abs().max().item(), what
    else:
        differ, ulps = _ulp_diff(o, r)
        assert ulps <= ulps_max and differ <= 0.01, (*what, differ, ulps)


def check_rms_norm(device: str, dtype: torch.dtype) -> None:
    from lorafleet.worker.layers import triton_elementwise as tri
    from lorafleet.worker.layers.rmsnorm import RMSNorm

    g = torch.Generator().manual_seed(0)
    for t, h in ((1, 64), (7, 576), (33, 960), (5, 2048)):
        norm = RMSNorm(h, 1e-5).to(device, dtype)
        norm.weight.data = (torch.rand(h, generator=g) + 0.5).to(device, dtype)
        wide = (torch.randn(t, 2 * h, generator=g) * 3).to(device, dtype)
        x = wide[:, :h]  # row-strided, like a slice of a fused output
        res = torch.randn(t, h, generator=g).to(device, dtype)
        with torch.no_grad():
            ref = norm(x)
            ref_n, ref_h = norm(x, residual=res)
            out = tri.rms_norm(x, norm.weight, norm.eps)
            out_n, out_h = tri.rms_norm(x, norm.weight, norm.eps, residual=res)
        assert _ulp_diff(out_h, ref_h) == (0.0, 0), "the residual add must round exactly as torch's"
        for o, r in ((out, ref), (out_n, ref_n)):
            # a one-ulp change of the normalised value can become two after the weight's product rounds again
            # (H200: 0.1% of the elements of a 2048-wide row differed, by at most 2 ulps)
            _close(o, r, (t, h, dtype), ulps_max=2)


def check_rotary(device: str, dtype: torch.dtype) -> None:
    from lorafleet.worker.layers import triton_elementwise as tri
    from lorafleet.worker.layers.rotary import RotaryEmbedding
    from transformers import LlamaConfig

    g = torch.Generator().manual_seed(1)
    for t, hq, hk, d, rope in ((5, 9, 3, 64, None), (16, 32, 8, 128, "llama3"), (1, 4, 4, 32, None)):
        scaling = (
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 64}
            if rope else None
        )  # fmt: skip
        cfg = LlamaConfig(hidden_size=hq * d, num_attention_heads=hq, rope_theta=500000.0, rope_scaling=scaling)
        rot = RotaryEmbedding(cfg, d, 512).to(device)
        qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(device, dtype)
        q = qkv[:, : hq * d].reshape(t, hq, d)
        k = qkv[:, hq * d : (hq + hk) * d].reshape(t, hk, d)
        pos = torch.randint(0, 512, (t,), generator=g).to(device)
        with torch.no_grad():
            rq, rk = rot(pos, q, k)
            oq, ok = tri.rotary(pos, q, k, rot.cos, rot.sin)
        for o, r in ((oq, rq), (ok, rk)):
            assert o.shape == r.shape and o.is_contiguous()
            if dtype == torch.float32:  # the compiler may contract a product and the sum into an fma
                _close(o, r, (t, hq, hk, d))
            else:  # every product and the sum round to bf16, as torch's ops do: exact
                assert _ulp_diff(o, r) == (0.0, 0), (t, hq, hk, d)


def check_silu(device: str, dtype: torch.dtype) -> None:
    from lorafleet.worker.layers import triton_elementwise as tri
    from lorafleet.worker.layers.activation import silu_and_mul

    g = torch.Generator().manual_seed(2)
    for t, n in ((1, 64), (9, 1536), (3, 2500)):
        gu = (torch.randn(t, 2 * n, generator=g) * 4).to(device, dtype)
        gate, up = gu.split(n, dim=-1)
        ref = silu_and_mul(gate, up)
        out = tri.silu_and_mul(gate, up)
        _close(out, ref, (t, n, dtype))


def check_model(device: str, dtype: torch.dtype) -> None:
    """A tiny Llama forward: kernels on vs off, through the fused q|k|v and gate|up views the engine serves."""
    from lorafleet.worker.layers.attention import DenseAttentionContext
    from lorafleet.worker.models.llama import LlamaForCausalLM
    from transformers import LlamaConfig

    torch.manual_seed(3)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).to(device, dtype)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    model.fuse_projections()
    ids = torch.randint(0, 97, (12,), device=device)
    pos = torch.cat([torch.arange(5), torch.arange(7)]).to(device)
    attn = DenseAttentionContext(seq_lens=[5, 7], scale=model.attn_scale)
    with torch.no_grad():
        ref = model.compute_logits(model(ids, pos, attn))
        model.use_triton_elementwise()
        out = model.compute_logits(model(ids, pos, attn))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (out - ref).abs().max().item() <= tol * ref.abs().max().item(), (out - ref).abs().max()
    # autograd forwards (training, fused replays) keep the torch layers: no Triton kernel in the graph
    layer = model.model.layers[0]
    h = torch.randn(12, 64, device=device, dtype=dtype, requires_grad=True)
    y = layer(h, pos, attn, None, None)
    y.sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    model.use_triton_elementwise(False)
    assert model.model.norm.kernel is None and model.model.layers[0].mlp.act_kernel is None


def _run_all(device: str) -> None:
    # Triton's interpreter converts fp32 to bf16 by truncation (compiled code rounds to nearest even), so the
    # bf16 bit-exactness is checked compiled on a GPU only
    for dtype in (torch.float32,) if device == "cpu" else (torch.float32, torch.bfloat16):
        check_rms_norm(device, dtype)
        check_rotary(device, dtype)
        check_silu(device, dtype)
        check_model(device, dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="compiled on this machine instead (test_kernels_compiled_on_gpu)")
def test_kernels_interpreted_on_cpu() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "elementwise ok" in proc.stdout


def test_torch_path_of_the_fused_residual_equals_the_unfused_layer() -> None:
    """The residual add moved into the next norm (`defer_residual`): the same bits as `h + layer(h)` chained."""
    from lorafleet.worker.layers.attention import DenseAttentionContext
    from lorafleet.worker.models.llama import LlamaForCausalLM
    from transformers import LlamaConfig

    torch.manual_seed(4)
    cfg = LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    ids = torch.randint(0, 61, (9,))
    pos = torch.arange(9)
    attn = DenseAttentionContext(seq_lens=[9], scale=model.attn_scale)
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        for layer in model.model.layers:
            h = layer(h, pos, attn, None, None)
        ref = model.model.norm(h)
        out = model(ids, pos, attn)
    assert torch.equal(out, ref)


def test_engine_config_refuses_a_non_bool_switch() -> None:
    from lorafleet.worker.config import EngineConfig

    with pytest.raises(ValueError, match="triton_elementwise must be a bool"):
        EngineConfig(model="m", triton_elementwise="yes").validate()  # type: ignore[arg-type]


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
def test_kernels_compiled_on_gpu() -> None:
    _run_all("cuda")


if __name__ == "__main__":
    torch.set_num_threads(1)
    _run_all("cpu")
    print("elementwise ok")
