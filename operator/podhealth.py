"""Why a worker pod is not serving, from its status alone: unschedulable, image pull, crash loop, bad config.

Pure, so every reason is unit-tested on pod bodies; the fleet turns the first problem into the BaseModel's
`Degraded` condition (and its printer columns), where a user looks, instead of leaving it in `kubectl describe pod`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lorafleet.operator.validation import Problem

IMAGE_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_REASONS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError", "ContainerCannotRun"}


def pod_problem(pod: Mapping[str, Any]) -> Problem | None:
    """The reason one pod does not start, or None when it runs (or is only starting normally)."""
    meta = pod.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return None
    name = meta.get("name", "?")
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason"):
            msg = cond.get("message") or cond["reason"]
            return Problem("WorkerUnschedulable", f"pod {name}: {msg}", fatal=False)
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason") or ""
        detail = waiting.get("message") or reason
        if reason in IMAGE_REASONS:
            return Problem("WorkerImagePull", f"pod {name}: {reason}: {detail}", fatal=False)
        if reason == "CrashLoopBackOff":
            last = (cs.get("lastState") or {}).get("terminated") or {}
            why = f"exit code {last.get('exitCode')}" + (f" ({last['reason']})" if last.get("reason") else "")
            restarts = cs.get("restartCount", 0)
            return Problem(
                "WorkerCrashLoop", f"pod {name}: container {cs.get('name')} {why}, {restarts} restarts", fatal=False
            )
        if reason in CONFIG_REASONS:
            return Problem("WorkerFailedToStart", f"pod {name}: {reason}: {detail}", fatal=False)
    if status.get("phase") == "Failed":
        return Problem(
            "WorkerFailed", f"pod {name}: {status.get('reason') or 'Failed'}: {status.get('message', '')}", fatal=False
        )
    return None


def pod_problems(pods: Iterable[Mapping[str, Any]]) -> list[Problem]:
    """Every pod's problem, sorted by pod name so the reported one is stable between cycles."""
    found = [(p.get("metadata", {}).get("name", ""), pod_problem(p)) for p in pods]
    return [prob for _, prob in sorted(found, key=lambda x: x[0]) if prob is not None]
