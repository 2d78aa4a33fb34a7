"""The scale-down plan: which pods go, and how many replicas the Deployment keeps while they are emptied."""

from __future__ import annotations

from lorafleet.operator.scaledown import PodState, plan_scale


def pods(*specs: tuple[str, bool, int]) -> list[PodState]:
    return [PodState(name=n, ready=r, adapters=a, template_hash="h1") for n, r, a in specs]


def test_no_surplus_applies_the_target() -> None:
    plan = plan_scale(2, pods(("a", True, 3), ("b", True, 1)))
    assert (plan.replicas, plan.victims) == (2, ())
    assert plan_scale(3, pods(("a", True, 3))).replicas == 3  # scale-up is immediate


def test_victims_are_the_cheapest_to_empty_and_hold_the_deployment_until_drained() -> None:
    plan = plan_scale(1, pods(("a", True, 3), ("b", True, 1), ("c", True, 2)))
    assert plan.victims == ("b", "c")
    assert plan.replicas == 3  # both still hold adapters: nothing is removed yet
    drained = plan_scale(1, pods(("a", True, 3), ("b", True, 0), ("c", True, 2)), retiring={"b", "c"})
    assert (drained.replicas, drained.victims) == (2, ("b", "c"))  # b may go now, c holds one replica back
    assert plan_scale(1, pods(("a", True, 3), ("b", True, 0), ("c", True, 0)), {"b", "c"}).replicas == 1


def test_not_ready_pods_go_first_and_chosen_victims_stay_chosen() -> None:
    assert plan_scale(2, pods(("a", True, 0), ("b", False, 0), ("c", True, 5))).victims == ("b",)
    # once picked, a victim stays picked even if another pod became cheaper meanwhile (no flip-flopping)
    assert plan_scale(2, pods(("a", True, 0), ("c", True, 5), ("d", True, 1)), retiring={"d"}).victims == ("d",)
    marked = [PodState("x", True, 9, template_hash="h1", marked=True), PodState("y", True, 0, template_hash="h1")]
    assert plan_scale(1, marked).victims == ("x",)  # chosen before an operator restart


def test_rollouts_and_terminating_pods_are_left_to_the_deployment() -> None:
    rollout = [PodState("a", True, 1, template_hash="old"), PodState("b", True, 0, template_hash="new")]
    assert plan_scale(1, rollout).victims == ()
    gone = [*pods(("a", True, 1)), PodState("b", True, 2, template_hash="h1", terminating=True)]
    assert (plan_scale(1, gone).replicas, plan_scale(1, gone).victims) == (1, ())
