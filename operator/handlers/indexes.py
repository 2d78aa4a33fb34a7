"""kopf in-memory indices: BaseModels, adapters and worker pods keyed by (namespace, basemodel).

kopf fills them from the API server before any handler runs, so after a restart the fleets start from the full
picture instead of from whatever events happen to arrive first.
"""

from __future__ import annotations

from typing import Any

import kopf
from lorafleet.operator import constants as c
from lorafleet.operator.state import index_key, snapshot


@kopf.index(c.GROUP, c.VERSION, c.BASEMODELS)
def basemodels_idx(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {index_key(namespace, name): snapshot(body)}


@kopf.index(c.GROUP, c.VERSION, c.ADAPTERS)
def adapters_idx(namespace: str, spec: kopf.Spec, body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {index_key(namespace, spec.get("baseModel")): snapshot(body)}


@kopf.index("v1", "pods", labels={c.LABEL_COMPONENT: c.COMPONENT_WORKER, c.LABEL_BASEMODEL: kopf.PRESENT})
def workerpods_idx(
    namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    return {index_key(namespace, labels.get(c.LABEL_BASEMODEL)): snapshot(body)}


@kopf.on.event("v1", "pods", labels={c.LABEL_COMPONENT: c.COMPONENT_WORKER, c.LABEL_BASEMODEL: kopf.PRESENT})
def pod_changed(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    """Any worker pod change (deleted, became Running, got its local endpoint) re-runs its fleet at once."""
    memo.runtime.wake(namespace, labels.get(c.LABEL_BASEMODEL))


@kopf.on.event(c.GROUP, c.VERSION, c.ADAPTERS)
def adapter_changed(namespace: str, spec: kopf.Spec, memo: kopf.Memo, **_: Any) -> None:
    memo.runtime.wake(namespace, spec.get("baseModel"))


@kopf.index(c.GROUP, c.VERSION, c.CLJOBS)
def cljobs_by_adapter_idx(
    namespace: str, name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any
) -> dict[tuple[str, str], tuple[str, str]]:
    """ContinualLearningJobs by adapter, as (creationTimestamp, name): one adapter trains under one job."""
    return {(namespace, str(spec.get("adapter"))): (str(meta.get("creationTimestamp") or ""), name)}


@kopf.index(c.GROUP, c.VERSION, c.CLJOBS)
def trainers_idx(namespace: str, name: str, annotations: kopf.Annotations, **_: Any) -> dict[tuple[str, str], str]:
    """ContinualLearningJobs by the worker pod they train on, so a new job goes to a worker with fewer."""
    pod = annotations.get(c.ANNOT_JOB_TRAINER)
    return {(namespace, pod): name} if pod else {}
