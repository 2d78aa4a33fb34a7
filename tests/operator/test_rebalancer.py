"""The rebalancer's translation to and from the OR-Tools placement model, on a hand-checkable skew."""

from __future__ import annotations

from lorafleet.operator.fleet import BaseModelFleet, Worker
from lorafleet.operator.metrics import OperatorMetrics
from lorafleet.operator.rebalancer import plan_moves
from lorafleet.operator.scrape import WorkerLoad
from lorafleet.operator.state import OperatorConfig, Runtime
from lorafleet.operator.workerclient import AdapterInfo

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
