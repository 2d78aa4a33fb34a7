"""Triton LoRA kernels and Triton paged attention against the torch references (`ops.py`, SDPA).

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1) in a subprocess, because the interpreter
must be chosen before Triton compiles anything in the process; this checks indexing, masking, segment search,
split-K and in-place semantics on small shapes. On a GPU the same cases run compiled, plus bf16 at model shapes.
Tolerances: fp32 inputs through the interpreter agree to ~1e-6; compiled fp32 dots use tf32 (~3e-4 relative,
METHOD.md), bf16 operands between 1e-3 and 1e-2, so the GPU bound is relative 2e-2 in bf16 and 5e-3 in fp32.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def _segments(lens: list[int], slots: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    indptr = [0]
    for n in lens:
        indptr.append(indptr[-1] + n)
    return (
        torch.tensor(indptr, dtype=torch.int32, device=device),
        torch.tensor(slots, dtype=torch.int32, device=device),
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


LORA_CASES = [
    # T, K, N, R, S, segment lengths, segment slots (-1 = no adapter, 0-length = padding segment)
    (37, 300, 200, 8, 5, [3, 0, 10, 1, 20, 3], [2, 4, -1, 0, 1, 2]),
    (20, 256, 64, 16, 3, [1] * 20, [i % 3 for i in range(20)]),
    (70, 1024, 96, 16, 3, [0, 35, 0, 35, 0], [0, 1, 2, -1, 1]),
    (5, 64, 48, 4, 2, [5, 0, 0, 0], [1, -1, -1, -1]),
]


def check_lora(device: str, dtype: torch.dtype, tol: float) -> None:
    from lorafleet.worker.lora import ops, triton_ops

    g = torch.Generator().manual_seed(1)
    for t, k, n, r, s, lens, slots in LORA_CASES:
        x = torch.randn(t, k, generator=g).to(device, dtype)
        a = (torch.randn(s, r, k, generator=g) / k**0.5).to(device, dtype)
        b = torch.randn(s, n, r, generator=g).to(device, dtype)
        # mixed ranks: slot 0 uses only the first r//2 rows/cols, the rest is zero padding
        a[0, r // 2 :] = 0
        b[0, :, r // 2 :] = 0
        sc = (torch.rand(s, generator=g) + 0.5).to(device)
        indptr, sl = _segments(lens, slots, device)
        v_ref = ops.lora_shrink(x.float(), a.float(), indptr, sl)
        poison = torch.full((t, r), float("nan"), device=device)
        v = triton_ops.lora_shrink(x, a, indptr, sl, out=poison)
        assert v.data_ptr() == poison.data_ptr()
        assert _rel(v, v_ref) < tol, (t, k, _rel(v, v_ref))
        no_adapter = torch.ones(t, dtype=torch.bool)
        for gi, sid in enumerate(slots):
            if sid >= 0:
                no_adapter[sum(lens[:gi]) : sum(lens[: gi + 1])] = False
        assert (v[no_adapter.to(device)] == 0).all()
        # expand into a strided slice of a wider output (fused-projection layout), in place
        wide = torch.randn(t, n + 40, generator=g).to(device, dtype)
        before = wide.clone()
        y_ref = ops.lora_expand(v_ref, b.float(), indptr, sl, sc, before[:, 10 : 10 + n].float().clone())
        ret = triton_ops.lora_expand(v_ref, b, indptr, sl, sc, wide[:, 10 : 10 + n])
        assert ret.data_ptr() == wide[:, 10:].data_ptr()
        assert _rel(wide[:, 10 : 10 + n], y_ref) < tol
        assert torch.equal(wide[:, :10], before[:, :10]) and torch.equal(wide[:, 10 + n :], before[:, 10 + n :])
        assert torch.equal(wide[no_adapter.to(device)], before[no_adapter.to(device)])


def check_fused(device: str, dtype: torch.dtype, tol: float) -> None:
    """`lora_shrink_accumulate` + `lora_expand_slices` (fused qkv-style projection) equal per-slice ops.py calls."""
    from lorafleet.worker.lora import ops, triton_ops

    g = torch.Generator().manual_seed(3)
    t, k, r, s = 45, 200, 8, 4
    outs = [64, 16, 16]  # q, k, v widths: slice bounds not aligned to the kernel's column tiles on purpose
    lens, slots = [10, 0, 5, 20, 10], [3, 0, -1, 1, 3]
    x = torch.randn(t, k, generator=g).to(device, dtype)
    a = [(torch.randn(s, r, k, generator=g) / k**0.5).to(device, dtype) for _ in outs]
    b = [torch.randn(s, n, r, generator=g).to(device, dtype) for n in outs]
    sc = (torch.rand(s, generator=g) + 0.5).to(device)
    indptr, sl = _segments(lens, slots, device)
    v = torch.full((t, 3 * r), 0.25, device=device)
    triton_ops.lora_shrink_accumulate(x, torch.cat(a, dim=1), indptr, sl, v)
    y = torch.randn(t, sum(outs), generator=g).to(device, dtype)
    y_ref = y.float().clone()
    bounds = (0, 64, 80, 96)
    for i in range(3):
        v_ref = ops.lora_shrink(x.float(), a[i].float(), indptr, sl)
        assert _rel(v[:, i * r : (i + 1) * r] - 0.25, v_ref) < tol
        ops.lora_expand(v_ref, b[i].float(), indptr, sl, sc, y_ref[:, bounds[i] : bounds[i + 1]])
    triton_ops.lora_expand_slices(v - 0.25, torch.cat(b, dim=1), indptr, sl, sc, y, bounds)
    assert _rel(y, y_ref) < tol
    with pytest.raises(ValueError):
        triton_ops.lora_expand_slices(v, torch.cat(b, dim=1), indptr, sl, sc, y, (0, 64, 95))


def check_attention(device: str, dtype: torch.dtype, tol: float) -> None:
    from lorafleet.worker.layers.triton_attention import paged_attention, paged_attention_reference

    g = torch.Generator().manual_seed(2)
    cases = [
        ([1, 1, 1], [5, 40, 100], 8, 2, 32),  # decode, GQA 4
        ([7, 20, 1, 0], [7, 50, 33, 0], 8, 2, 32),  # prefill, extend over a paged prefix, decode, padding
        ([3], [3], 4, 4, 64),  # MHA
        ([1, 1], [0, 17], 8, 1, 64),  # graph padding row (seq_len 0), MQA
    ]
    for q_lens, ctxs, h, hkv, d in cases:
        page, nb = 16, 64
        kc = torch.randn(nb, page, hkv, d, generator=g).to(device, dtype)
        vc = torch.randn(nb, page, hkv, d, generator=g).to(device, dtype)
        maxb = max((c + page - 1) // page for c in ctxs) + 1
        bt = torch.stack([torch.randperm(nb, generator=g)[:maxb] for _ in ctxs]).int().to(device)
        qi = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
        q = torch.randn(int(qi[-1]), h, d, generator=g).to(device, dtype)
        sl = torch.tensor(ctxs, dtype=torch.int32, device=device)
        out = torch.full_like(q, float("nan"))
        o = paged_attention(q, kc, vc, bt, sl, qi, max(q_lens), out=out)
        ref = paged_attention_reference(q.float(), kc.float(), vc.float(), bt, sl, qi)
        assert _rel(o, ref) < tol, (q_lens, ctxs, _rel(o, ref))


def _triton_version() -> tuple[int, int]:
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2])  # type: ignore[return-value]


@pytest.mark.skipif(
    _triton_version() < (3, 7),
    reason="Triton < 3.7's interpreter cannot iterate over a range bounded by loaded scalars (compiled code can)",
)
def test_triton_kernels_interpreted_on_cpu() -> None:
    """The compiled-kernel logic, run by Triton's interpreter in a fresh process (fp32, exact to rounding)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lora ok" in proc.stdout and "attention ok" in proc.stdout


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
def test_lora_gpu_fp32_and_bf16() -> None:
    check_lora("cuda", torch.float32, 5e-3)
    check_lora("cuda", torch.bfloat16, 2e-2)
    check_fused("cuda", torch.float32, 5e-3)
    check_fused("cuda", torch.bfloat16, 2e-2)


@gpu
@pytest.mark.parametrize("t,distinct", [(1, 1), (256, 32), (256, 128), (3000, 7)])
def test_lora_gpu_model_shapes(t: int, distinct: int) -> None:
    """Llama-3.1-8B projection shapes (q 4096->4096, down 14336->4096), decode batches and a prefill batch."""
    from lorafleet.worker.lora import ops, triton_ops

    torch.manual_seed(t)
    s, r = 128, 16
    for k, n in ((4096, 4096), (14336, 4096), (4096, 1024)):
        x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(s, r, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        b = torch.randn(s, n, r, device="cuda", dtype=torch.bfloat16) * 0.05
        sc = torch.rand(s, device="cuda") + 0.5
        slots = sorted(torch.randint(0, s, (distinct,)).tolist())
        cuts = sorted(torch.randint(0, t + 1, (distinct - 1,)).tolist())
        lens = [e - b_ for b_, e in zip([0] + cuts, cuts + [t], strict=True)]
        indptr, sl = _segments(lens, slots, "cuda")
        v_ref = ops.lora_shrink(x.float(), a.float(), indptr, sl)
        v = triton_ops.lora_shrink(x, a, indptr, sl, out=torch.full((t, r), float("nan"), device="cuda"))
        assert _rel(v, v_ref) < 1e-2
        y = torch.randn(t, n, device="cuda", dtype=torch.bfloat16)
        y_ref = ops.lora_expand(v_ref, b.float(), indptr, sl, sc, y.float().clone())
        triton_ops.lora_expand(v, b, indptr, sl, sc, y)
        assert _rel(y, y_ref) < 1e-2


@gpu
def test_attention_gpu_fp32_and_bf16() -> None:
    check_attention("cuda", torch.float32, 5e-3)
    check_attention("cuda", torch.bfloat16, 2e-2)


if __name__ == "__main__":
    torch.set_num_threads(1)
    check_lora("cpu", torch.float32, 1e-5)
    check_fused("cpu", torch.float32, 1e-5)
    print("lora ok")
    check_attention("cpu", torch.float32, 1e-5)
    print("attention ok")
