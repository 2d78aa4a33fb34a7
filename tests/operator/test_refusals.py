"""Every failure visible where the user looks: children the API server refuses, pods that cannot start, and a second
ContinualLearningJob on a trained adapter, each as a condition on the owning CR and one aggregated Event.

Real API server (its own validation produces the messages), the operator as its least-privilege ServiceAccount.
BaseModels here run no worker processes (replicas 0, or pods that cannot be scheduled).
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from lorafleet.operator import constants as c

from lorafleet.controlplane import binaries
from lorafleet.local.harness import LocalFleet, wait_for
from lorafleet.local.samples import basemodel

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(400)]

# BaseModel name -> (spec.worker patch, words of the API server's refusal)
REFUSED = {
    "memory-lots": ({"resources": {"limits": {"memory": "lots"}}}, "quantities must match the regular expression"),
    "typo-key": ({"resources": {"limts": {"cpu": "1"}}}, "limts"),
    "req-over-limit": (
        {"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}},
        "must be less than or equal to cpu limit",
    ),
    "bad-selector": ({"nodeSelector": {"bad key!": "x"}}, "bad key!"),
    "bad-toleration": ({"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]}, "must be empty"),
}


def _degraded(fleet: LocalFleet, name: str) -> dict | None:
    cond = fleet.condition(c.BASEMODELS, name, "Degraded")
    return cond if cond and cond["status"] == "True" and cond["reason"] == "ChildRejected" else None


def test_refused_children_set_degraded_with_the_api_servers_words_and_one_event(fleet: LocalFleet, tiny_assets) -> None:
    for name, (worker, _) in REFUSED.items():
        body = basemodel(name, tiny_assets["model"], replicas=0)
        body["spec"]["worker"] = {**body["spec"]["worker"], **worker}
        fleet.create(c.BASEMODELS, body)
    dotdot = basemodel("dot-dot", "/root/../etc", replicas=0)  # a hostPath the API server refuses
    fleet.create(c.BASEMODELS, dotdot)
    expected = {name: words for name, (_, words) in REFUSED.items()} | {"dot-dot": "'..'"}
    for name, words in expected.items():
        cond = wait_for(lambda name=name: _degraded(fleet, name), 60, 0.2, f"{name} Degraded")
        assert "refused by the API server (HTTP " in cond["message"] and words in cond["message"], cond
        assert f"Deployment {name}-worker" in cond["message"]
        assert fleet.get(c.BASEMODELS, name)["status"]["message"] == cond["message"][:1024]
    time.sleep(12)  # the operator retries a refused child every 5 s: the retries must not add Event objects
    for name in expected:
        events = [e for e in fleet.events_for(name) if e.reason == "ChildRejected"]
        assert len(events) == 1, [(e.metadata.name, e.count, e.message) for e in events]
        assert events[0].type == "Warning" and events[0].count >= 1 and expected[name] in events[0].message
    # the printer column shows it
    out = subprocess.run(
        [str(binaries().kubectl), "get", "bm", "memory-lots", "-n", fleet.namespace, "--kubeconfig", fleet.kubeconfig],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "MESSAGE" in out.splitlines()[0] and "refused by the API server" in out
    # fixing the spec clears it
    fleet.patch(c.BASEMODELS, "memory-lots", {"spec": {"worker": {"resources": {"limits": {"memory": "1Gi"}}}}})
    wait_for(lambda: not _degraded(fleet, "memory-lots"), 30, 0.2, "Degraded cleared")
    for name in expected:
        fleet.delete(c.BASEMODELS, name)


def test_unschedulable_workers_reach_the_basemodel(fleet: LocalFleet, tiny_assets) -> None:
    body = basemodel("nowhere", tiny_assets["model"], replicas=1)
    body["spec"]["worker"]["nodeSelector"] = {"lorafleet.io/no-such-node": "true"}
    fleet.create(c.BASEMODELS, body)

    def unschedulable() -> dict | None:
        cond = fleet.condition(c.BASEMODELS, "nowhere", "Degraded")
        return cond if cond and cond["reason"] == "WorkerUnschedulable" else None

    cond = wait_for(unschedulable, 60, 0.3, "WorkerUnschedulable")
    assert cond["status"] == "True" and "nowhere-worker-" in cond["message"] and "node" in cond["message"]
    wait_for(lambda: any(e.reason == "WorkerUnschedulable" for e in fleet.events_for("nowhere")), 20, 0.2)
    fleet.delete(c.BASEMODELS, "nowhere")


def test_second_job_on_an_adapter_fails_once_without_retries(fleet: LocalFleet) -> None:
    def job(name: str) -> dict:
        return {
            "apiVersion": "lorafleet.io/v1alpha1",
            "kind": "ContinualLearningJob",
            "metadata": {"name": name},
            "spec": {"adapter": "contested", "optimizer": {"maxSteps": 2}},
        }

    fleet.create(c.CLJOBS, job("first-job"))
    time.sleep(1.5)  # creationTimestamp has a resolution of one second: the first job is the older one
    fleet.create(c.CLJOBS, job("second-job"))

    def failed() -> dict | None:
        st = (fleet.get(c.CLJOBS, "second-job") or {}).get("status") or {}
        return st if st.get("phase") == "Failed" else None

    st = wait_for(failed, 30, 0.2, "second job Failed")
    ready = next(x for x in st["conditions"] if x["type"] == "Ready")
    assert ready["reason"] == "AdapterAlreadyTraining" and "ContinualLearningJob first-job" in ready["message"]
    time.sleep(10)  # no retry loop: the status stays, and no further Event objects appear
    events = [e for e in fleet.events_for("second-job") if e.type == "Warning"]
    assert [(e.reason, e.count) for e in events] == [("AdapterAlreadyTraining", 1)], [e.message for e in events]
    assert (fleet.get(c.CLJOBS, "first-job")["status"] or {}).get("phase") != "Failed"
    assert json.dumps(fleet.get(c.CLJOBS, "second-job")["status"]) == json.dumps(failed())
    for name in ("first-job", "second-job"):
        fleet.delete(c.CLJOBS, name)
