"""The rebalancer's translation to and from the OR-Tools placement model, on a hand-checkable skew."""

from __future__ import annotations

from pathlib import Path

from lorafleet.operator.capacity import DEFAULT_ADAPTER_BYTES, adapter_bytes, worker_memory, worker_slots
from lorafleet.operator.fleet import BaseModelFleet, Worker
from lorafleet.operator.metrics import OperatorMetrics
from lorafleet.operator.rebalancer import plan_moves
from lorafleet.operator.scrape import WorkerLoad
from lorafleet.operator.state import OperatorConfig, Runtime
from lorafleet.operator.workerclient import AdapterInfo

RANKS = {"a": 4, "b": 4, "big": 64}
BM = {"metadata": {"name": "m"}, "spec": {"replicas": 2, "limits": {"maxAdapters": 4, "maxRank": 64}}}


def body(name: str) -> dict:
    return {"metadata": {"name": name}, "spec": {"baseModel": "m", "source": {"uri": "s3://b/x"}, "rank": 8}}


def fleet_with(placement: dict[str, dict[str, float]]) -> BaseModelFleet:
    rt = Runtime(config=OperatorConfig(), kube=None, metrics=OperatorMetrics())  # type: ignore[arg-type]
    fleet = BaseModelFleet(rt, "ns", "m")
    fleet.workers = [
        Worker(pod=w, uid=None, ip=None, node=f"node-{w}", endpoint=None, draining=False,
               adapters={a: AdapterInfo(a) for a in rates}, load=WorkerLoad(adapter_rate=dict(rates)))
        for w, rates in placement.items()
    ]  # fmt: skip
    return fleet


def test_hot_worker_sheds_one_adapter_to_the_idle_one() -> None:
    fleet = fleet_with({"w0": {"a": 10.0, "b": 10.0}, "w1": {"c": 1.0}})
    out = plan_moves(fleet, BM, [body("a"), body("b"), body("c")])
    assert out is not None
    result, moves = out
    assert len(moves) == 1
    adapter, src, dst = moves[0]
    assert adapter in {"a", "b"} and (src, dst) == ("w0", "w1")
    assert result.max_over_mean < 1.2


def test_balanced_or_unmeasured_fleets_do_not_move() -> None:
    balanced = fleet_with({"w0": {"a": 5.0}, "w1": {"b": 5.2}})
    out = plan_moves(balanced, BM, [body("a"), body("b")])
    assert out is not None and out[1] == []
    idle = fleet_with({"w0": {"a": 0.0, "b": 0.0}, "w1": {}})
    assert plan_moves(idle, BM, [body("a"), body("b")]) is None


def _local(name: str, path: Path) -> dict:
    return {"metadata": {"name": name}, "spec": {"baseModel": "m", "source": {"uri": str(path)}}}


def test_memory_constrained_worker_gets_no_adapter_that_does_not_fit(tmp_path: Path) -> None:
    """Real adapter files: two small hot adapters on w0, one large cold adapter on w1. Load says move a small one to
    w1; w1's adapterMemoryBytes says it does not fit next to the large one, so nothing moves. With one more small
    adapter's worth of budget the same skew moves exactly one."""
    import torch
    from lorafleet.worker.testing import build_peft_adapter, build_tiny_llama

    torch.set_num_threads(1)
    model = build_tiny_llama(tmp_path / "model")
    paths = {n: build_peft_adapter(tmp_path / n, model, rank=r, seed=i) for i, (n, r) in enumerate(RANKS.items())}
    sizes = {n: adapter_bytes(_local(n, p)) for n, p in paths.items()}
    # the sizes are the weight files' (rank 4 vs rank 64: 16x the LoRA parameters), not a fixed 64 MiB
    assert sizes["a"] == sizes["b"] == (paths["a"] / "adapter_model.safetensors").stat().st_size
    assert sizes["big"] > 10 * sizes["a"] and DEFAULT_ADAPTER_BYTES not in sizes.values()
    bodies = [_local(n, p) for n, p in paths.items()]
    skew = {"w0": {"a": 10.0, "b": 10.0}, "w1": {"big": 1.0}}

    def limits(memory: int) -> dict:
        return {"metadata": {"name": "m"}, "spec": {"limits": {"maxAdapters": 4, "adapterMemoryBytes": memory}}}

    tight = sizes["big"] + sizes["a"] - 1  # w1 holds big; a small one would overflow it
    out = plan_moves(fleet_with(skew), limits(max(tight, 2 * sizes["a"])), bodies)
    assert out is not None
    result, moves = out
    assert moves == []
    assert all("w1" not in result.assignment[n] for n in ("a", "b"))

    roomy = sizes["big"] + sizes["a"] + 2048  # one small adapter fits next to big (the model counts whole KiB)
    out = plan_moves(fleet_with(skew), limits(roomy), bodies)
    assert out is not None
    result, moves = out
    assert len(moves) == 1 and moves[0][0] in {"a", "b"} and moves[0][1:] == ("w0", "w1")
    on_w1 = [n for n, ws in result.assignment.items() if "w1" in ws]
    assert sum(sizes[n] for n in on_w1) <= roomy


def test_worker_reported_size_wins_and_slots_are_the_host_cache() -> None:
    info = AdapterInfo("a", extra={"size_bytes": 123_456})
    assert adapter_bytes(body("a"), [info]) == 123_456
    assert adapter_bytes(body("a")) == DEFAULT_ADAPTER_BYTES  # remote source, nothing reported
    assert worker_slots({"maxAdapters": 8}) == 8
    assert worker_slots({"maxAdapters": 8, "maxCpuAdapters": 32}) == 32  # GPU slots are part of the host cache
    assert worker_memory({}) > 1 << 50 and worker_memory({"adapterMemoryBytes": 1 << 30}) == 1 << 30
