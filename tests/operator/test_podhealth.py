"""Why a worker pod does not start, read from its status (what the BaseModel's Degraded condition says)."""

from __future__ import annotations

from lorafleet.operator.podhealth import pod_problem, pod_problems


def pod(name: str, **status: object) -> dict:
    return {"metadata": {"name": name}, "status": status}


def waiting(reason: str, message: str = "", **extra: object) -> dict:
    return {"name": "worker", "state": {"waiting": {"reason": reason, "message": message}}, **extra}


def test_unschedulable_image_pull_crash_loop_and_config_errors() -> None:
    unsched = pod("p", phase="Pending", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available"}
    ])  # fmt: skip
    assert (pod_problem(unsched).reason, pod_problem(unsched).message) == (
        "WorkerUnschedulable",
        "pod p: 0/3 nodes are available",
    )
    pull = pod("q", containerStatuses=[waiting("ImagePullBackOff", 'Back-off pulling image "nope:1"')])
    assert pod_problem(pull).reason == "WorkerImagePull" and "nope:1" in pod_problem(pull).message
    crash = pod("r", containerStatuses=[
        waiting("CrashLoopBackOff", restartCount=4, lastState={"terminated": {"exitCode": 137, "reason": "OOMKilled"}})
    ])  # fmt: skip
    assert pod_problem(crash).reason == "WorkerCrashLoop"
    assert pod_problem(crash).message == "pod r: container worker exit code 137 (OOMKilled), 4 restarts"
    cfg = pod("s", containerStatuses=[waiting("CreateContainerConfigError", 'secret "x" not found')])
    assert pod_problem(cfg).reason == "WorkerFailedToStart"
    assert not pod_problem(crash).fatal


def test_running_starting_and_terminating_pods_have_no_problem() -> None:
    assert pod_problem(pod("a", phase="Running", containerStatuses=[{"name": "w", "state": {"running": {}}}])) is None
    assert pod_problem(pod("b", phase="Pending", containerStatuses=[waiting("ContainerCreating")])) is None
    gone = pod("c", containerStatuses=[waiting("CrashLoopBackOff")])
    gone["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert pod_problem(gone) is None


def test_problems_are_ordered_by_pod_name() -> None:
    a = pod("b-pod", containerStatuses=[waiting("ErrImagePull")])
    b = pod("a-pod", containerStatuses=[waiting("CrashLoopBackOff")])
    assert [p.reason for p in pod_problems([a, b])] == ["WorkerCrashLoop", "WorkerImagePull"]
