"""Checkpoint store: atomic write, verification (every way a checkpoint can be damaged is detected and the next older
one is used), pruning, and AdamW state that really continues the optimisation."""

from __future__ import annotations

import json

import torch
from lorafleet.worker.training.checkpoint import CheckpointStore, optimizer_tensors, restore_optimizer


def _train(params, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g)
        loss = ((x @ params[0].t() @ params[1].t()) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _fresh():
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3, 6, generator=g)), torch.nn.Parameter(torch.randn(4, 3, generator=g))]
    return ps, torch.optim.AdamW(ps, lr=0.05, weight_decay=0.01)


def test_adamw_state_round_trip_continues_exactly(tmp_path):
    names = ["a", "b"]
    ps, opt = _fresh()
    _train(ps, opt, 5, seed=1)
    store = CheckpointStore(tmp_path)
    tensors = {f"w.{n}": p.detach().clone() for n, p in zip(names, ps, strict=True)}
    tensors.update(optimizer_tensors(opt, names))
    store.save(5, tensors, {"note": "x"})
    _train(ps, opt, 5, seed=2)  # the uninterrupted run

    ck = store.load_latest().checkpoint
    assert ck is not None and ck.step == 5 and ck.state == {"note": "x"}
    qs, opt2 = _fresh()
    with torch.no_grad():
        for n, q in zip(names, qs, strict=True):
            q.copy_(ck.tensors[f"w.{n}"])
    restore_optimizer(opt2, names, ck.tensors)
    assert float(opt2.state[qs[0]]["step"]) == 5.0
    _train(qs, opt2, 5, seed=2)
    for p, q in zip(ps, qs, strict=True):
        assert torch.equal(p, q)

    # without the optimizer state (what a restart from a published version did) the run is a different one
    rs, opt3 = _fresh()
    with torch.no_grad():
        for n, r in zip(names, rs, strict=True):
            r.copy_(ck.tensors[f"w.{n}"])
    _train(rs, opt3, 5, seed=2)
    assert float((rs[0] - ps[0]).detach().abs().max()) > 1e-3


def test_damaged_checkpoints_are_detected_and_skipped(tmp_path):
    store = CheckpointStore(tmp_path, keep=10)
    for step in range(1, 7):
        store.save(step, {"t": torch.full((64,), float(step))}, {"step": step})
    d = {s: tmp_path / f"step-{s:08d}" for s in range(1, 7)}
    (d[6] / "state.json").unlink()  # partial: the manifest never made it
    raw = (d[5] / "tensors.safetensors").read_bytes()
    (d[5] / "tensors.safetensors").write_bytes(raw[: len(raw) // 2])  # truncated
    blob = bytearray((d[4] / "tensors.safetensors").read_bytes())
    blob[-1] ^= 0x01  # one bit flipped, same size
    (d[4] / "tensors.safetensors").write_bytes(bytes(blob))
    (d[3] / "state.json").write_text('{"format": 1, "step": 3, "tens')  # torn manifest
    m = json.loads((d[2] / "state.json").read_text())
    torn = tmp_path / ".tmp-00000007-1-1"
    torn.mkdir()
    (torn / "tensors.safetensors").write_bytes(b"\0" * 10)

    res = store.load_latest()
    assert res.checkpoint is not None and res.checkpoint.step == 2
    assert torch.equal(res.checkpoint.tensors["t"], torch.full((64,), 2.0))
    assert res.checkpoint.state == m["state"] == {"step": 2}
    reasons = {b["step"]: b["reason"] for b in res.corrupt}
    assert list(reasons) == [6, 5, 4, 3]
    assert "missing" in reasons[6] and "bytes" in reasons[5] and "SHA-256" in reasons[4] and "parse" in reasons[3]
    assert not torn.exists()

    # a rejected (unusable) checkpoint is skipped like a corrupt one
    def accept(ck):
        if ck.step == 2:
            raise ValueError("does not fit the job")

    res = store.load_latest(accept)
    assert (
        res.checkpoint is not None and res.checkpoint.step == 1 and res.corrupt[-1]["reason"] == "does not fit the job"
    )
    for b in res.corrupt:
        store.discard(tmp_path / f"step-{b['step']:08d}")
    assert [s for s, _ in store.steps()] == [1]


def test_save_replaces_same_step_and_prunes(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (1, 2, 3, 3):
        store.save(step, {"t": torch.tensor([float(step)])}, {})
    assert [s for s, _ in store.steps()] == [2, 3]
    assert not list(tmp_path.glob(".tmp-*"))
