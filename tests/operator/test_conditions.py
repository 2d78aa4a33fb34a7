from __future__ import annotations

from lorafleet.operator import conditions as cond


def test_transition_time_moves_only_on_flip() -> None:
    c1 = cond.set_condition([], "Ready", False, "Placing", "wait", 1, now="t1")
    c2 = cond.set_condition(c1, "Ready", False, "Placing", "still", 2, now="t2")
    assert c2[0]["lastTransitionTime"] == "t1" and c2[0]["message"] == "still" and c2[0]["observedGeneration"] == 2
    c3 = cond.set_condition(c2, "Ready", True, "Routable", "ok", 2, now="t3")
    assert c3[0]["lastTransitionTime"] == "t3" and c3[0]["status"] == "True"
    c4 = cond.set_condition(c3, "Degraded", False, "AsExpected", "", 2, now="t4")
    assert [c["type"] for c in c4] == ["Ready", "Degraded"]
    assert cond.is_true(c4, "Ready") and not cond.is_true(c4, "Degraded") and not cond.is_true(c4, "Placed")


def test_same_ignoring_time() -> None:
    a = cond.set_condition([], "Ready", True, "R", "m", 1, now="t1")
    b = cond.set_condition([], "Ready", True, "R", "m", 1, now="t9")
    assert cond.same_ignoring_time(a, b)
    assert not cond.same_ignoring_time(a, cond.set_condition(b, "Ready", True, "R", "other", 1))
