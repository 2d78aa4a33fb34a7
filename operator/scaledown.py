"""Which worker pods go when a BaseModel has more pods than `spec.replicas`, and when the Deployment may shrink.

The operator, not the ReplicaSet, picks the victims: the ones that cost least to empty (not ready first, then the
fewest adapters, then the least traffic). Victims get the lowest `controller.kubernetes.io/pod-deletion-cost`, take
no new adapters, and have theirs handed off; the Deployment keeps one replica per victim that still holds something,
so the ReplicaSet only ever deletes pods that are already drained. Pure: the fleet observes, this decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
VICTIM_COST = "-1000000"  # lower than any cost a user would set; the ReplicaSet deletes the lowest first


@dataclass(frozen=True)
class PodState:
    name: str
    ready: bool
    adapters: int  # adapters the worker holds, plus drains of it still running
    load: float = 0.0
    template_hash: str | None = None
    terminating: bool = False
    marked: bool = False  # carries our deletion cost already (a victim chosen before an operator restart)


@dataclass(frozen=True)
class ScalePlan:
    replicas: int  # what the Deployment's spec.replicas should say now
    victims: tuple[str, ...]  # pods being emptied for removal (sorted)


def _cost(p: PodState) -> tuple[bool, int, float, str]:
    return (p.ready, p.adapters, p.load, p.name)


def plan_scale(target: int, pods: Iterable[PodState], retiring: Iterable[str] = ()) -> ScalePlan:
    """The Deployment replicas and victims for `target` workers.

    During a rollout (live pods from more than one pod template) the Deployment's own surge is at work: nothing is
    picked and the target is applied as is; pods the rollout deletes are drained as they terminate.
    """
    live = [p for p in pods if not p.terminating]
    if len({p.template_hash for p in live}) > 1:
        return ScalePlan(target, ())
    surplus = len(live) - target
    if surplus <= 0:
        return ScalePlan(target, ())
    keep = set(retiring)
    chosen = sorted(live, key=lambda p: (not (p.name in keep or p.marked), *_cost(p)))[:surplus]
    undrained = [p for p in chosen if p.adapters > 0]
    return ScalePlan(target + len(undrained), tuple(sorted(p.name for p in chosen)))


def pod_states(
    pods: Iterable[Mapping[str, Any]], held: Mapping[str, int], ready: set[str], load: Mapping[str, float]
) -> list[PodState]:
    """The planner's view of the pods: `held` adapters (plus drains still running) per pod, the pods whose worker
    answered and is running, and each pod's measured load."""
    out = []
    for pod in pods:
        meta = pod["metadata"]
        name = meta["name"]
        out.append(
            PodState(
                name=name,
                ready=name in ready,
                adapters=held.get(name, 0),
                load=load.get(name, 0.0),
                template_hash=(meta.get("labels") or {}).get("pod-template-hash"),
                terminating=bool(meta.get("deletionTimestamp")),
                marked=(meta.get("annotations") or {}).get(DELETION_COST) == VICTIM_COST,
            )
        )
    return out
