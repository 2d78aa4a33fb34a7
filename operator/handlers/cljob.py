"""ContinualLearningJob: start/stop training on a worker that serves the adapter and mirror progress into status.

Each newly published version is recorded on the LoRAAdapter (annotation `lorafleet.io/published-source`); the
fleet then reloads every other replica in place (new requests switch, in-flight ones finish on the old weights) and
loads that version on new replicas. The trainer pod is recorded too, so the fleet never reloads under the trainer.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import kopf
from lorafleet.operator import conditions, training
from lorafleet.operator import constants as c
from lorafleet.operator.state import Runtime
from lorafleet.operator.validation import published_versions
from lorafleet.operator.workerclient import WorkerError

log = logging.getLogger(__name__)


def _holders(rt: Runtime, namespace: str, adapter: dict[str, Any]) -> list[Any]:
    fleet = rt.fleet(namespace, str((adapter.get("spec") or {}).get("baseModel")))
    if fleet is None:
        return []
    name = adapter["metadata"]["name"]
    return sorted((w for w in fleet.workers if w.holds(name) and w.client is not None), key=lambda w: w.pod)


async def _recorded_trainer(
    rt: Runtime, namespace: str, spec: kopf.Spec, annotations: kopf.Annotations
) -> tuple[str, dict[str, Any], Any] | None:
    """(trainer pod, adapter, its worker or None when that pod no longer serves the adapter) for a started job;
    None when the job never started or its adapter is gone (sync and stop both have nothing to do then)."""
    pod = annotations.get(c.ANNOT_JOB_TRAINER)
    adapter = await rt.kube.get_cr(c.ADAPTERS, namespace, spec["adapter"])
    if not pod or adapter is None:
        return None
    return pod, adapter, {w.pod: w for w in _holders(rt, namespace, adapter)}.get(pod)


async def _set_status(
    rt: Runtime,
    ns: str,
    name: str,
    body: kopf.Body,
    status: dict[str, Any],
    ok: bool,
    reason: str,
    msg: str,
    latency: training.LatencyCondition | None = None,
) -> None:
    gen = body["metadata"].get("generation")
    conds = conditions.set_condition((body.get("status") or {}).get("conditions"), "Ready", ok, reason, msg, gen)
    if latency is not None:
        conds = conditions.set_condition(
            conds, training.LATENCY_CONDITION, latency.met, latency.reason, latency.message, gen
        )
    await rt.kube.patch_status(c.CLJOBS, ns, name, {**status, "observedGeneration": gen, "conditions": conds})


@kopf.on.resume(c.GROUP, c.VERSION, c.CLJOBS)
@kopf.on.create(c.GROUP, c.VERSION, c.CLJOBS)
async def cljob_start(
    body: kopf.Body,
    spec: kopf.Spec,
    name: str,
    namespace: str,
    memo: kopf.Memo,
    patch: kopf.Patch,
    annotations: kopf.Annotations,
    trainers_idx: kopf.Index,
    cljobs_by_adapter_idx: kopf.Index,
    **_: Any,
) -> None:
    rt: Runtime = memo.runtime
    rival = training.owning_job(list(cljobs_by_adapter_idx.get((namespace, str(spec["adapter"])), [])), name)
    if rival is not None:
        await _refuse_duplicate(rt, body, name, namespace, f"ContinualLearningJob {rival}")
        return
    adapter = await rt.kube.get_cr(c.ADAPTERS, namespace, spec["adapter"])
    if adapter is None:
        await _set_status(
            rt,
            namespace,
            name,
            body,
            {"phase": "Pending"},
            False,
            "AdapterNotFound",
            f"LoRAAdapter {spec['adapter']} does not exist",
        )
        raise kopf.TemporaryError("adapter not found", delay=5)
    holders = _holders(rt, namespace, adapter)
    if not holders:
        await _set_status(
            rt,
            namespace,
            name,
            body,
            {"phase": "Pending"},
            False,
            "AdapterNotPlaced",
            "waiting for a worker that serves the adapter",
        )
        raise kopf.TemporaryError("adapter not placed yet", delay=2)
    trainer = _pick(holders, namespace, name, trainers_idx, annotations.get(c.ANNOT_JOB_TRAINER))
    await _start(rt, body, spec, name, namespace, trainer, patch)
    rt.event(body, "Normal", "Started", f"training {spec['adapter']} on worker {trainer.pod}")
    await _set_status(rt, namespace, name, body, {"phase": "Running"}, True, "Training", f"on worker {trainer.pod}")


async def _refuse_duplicate(rt: Runtime, body: kopf.Body, name: str, namespace: str, rival: str) -> None:
    """One adapter trains under one job: the later job fails for good (no retry, one Event)."""
    adapter = body["spec"]["adapter"]
    msg = f"adapter {adapter} is already trained by {rival}; delete that job first (one job per adapter)"
    await _set_status(rt, namespace, name, body, {"phase": "Failed"}, False, "AdapterAlreadyTraining", msg)
    rt.event(body, "Warning", "AdapterAlreadyTraining", msg)


def _pick(holders: list[Any], namespace: str, name: str, trainers_idx: kopf.Index, recorded: str | None) -> Any:
    jobs = {w.pod: sum(1 for j in trainers_idx.get((namespace, w.pod), []) if j != name) for w in holders}
    pod = training.choose_trainer(
        [(w.pod, w.draining, jobs[w.pod], w.load.total_rate if w.load else 0.0) for w in holders], recorded
    )
    return next(w for w in holders if w.pod == pod)


async def _start(
    rt: Runtime, body: kopf.Body, spec: kopf.Spec, name: str, namespace: str, trainer: Any, patch: kopf.Patch
) -> None:
    """Starts (or adopts, 409) the job on `trainer` and records it there. A worker resumes a job from the newest
    checkpoint it can read (the shared adapter store), so a restart elsewhere continues where the old one was."""
    try:
        await trainer.client.post("/v1/training/jobs", training.job_request(name, spec))
    except WorkerError as exc:
        if exc.status == 409 and "already has a job" in exc.message:  # another job trains it there
            await _refuse_duplicate(rt, body, name, namespace, f"a job on worker {trainer.pod}")
            raise kopf.PermanentError(exc.message) from exc
        if exc.status != 409:  # 409: this job already runs there (operator restart) — adopt it
            await _set_status(rt, namespace, name, body, {"phase": "Failed"}, False, "WorkerRefused", exc.message)
            rt.event(body, "Warning", "WorkerRefused", exc.message)
            raise kopf.TemporaryError(exc.message, delay=10) from exc
    patch.metadata.annotations[c.ANNOT_JOB_TRAINER] = trainer.pod
    await rt.kube.patch_cr(
        c.ADAPTERS, namespace, spec["adapter"], {"metadata": {"annotations": {c.ANNOT_TRAINER_POD: trainer.pod}}}
    )


async def _recover(
    rt: Runtime,
    body: kopf.Body,
    spec: kopf.Spec,
    name: str,
    namespace: str,
    pod: str,
    adapter: dict[str, Any],
    trainers_idx: kopf.Index,
    patch: kopf.Patch,
) -> None:
    """The recorded trainer no longer serves the adapter. While its worker is only unreachable, wait (moving then
    could leave two copies training); once the pod is gone or answers without the adapter, start the job on
    another holder, which resumes it from its newest checkpoint: no accepted feedback or finished step is lost."""
    fleet = rt.fleet(namespace, str((adapter.get("spec") or {}).get("baseModel")))
    old = next((w for w in fleet.workers if w.pod == pod), None) if fleet is not None else None
    if old is not None and not old.reachable:
        await _set_status(rt, namespace, name, body, {}, False, "TrainerUnreachable", f"waiting for worker {pod}")
        return
    holders = _holders(rt, namespace, adapter)
    if not holders:
        await _set_status(
            rt, namespace, name, body, {}, False, "TrainerLost", f"worker {pod} no longer serves the adapter"
        )
        return
    if old is not None and old.client is not None:  # it answers but lost the adapter: stop its copy first
        try:
            await old.client.request("DELETE", f"/v1/training/jobs/{name}")
        except WorkerError as exc:
            if exc.status != 404:
                log.info("job %s: stopping it on %s failed: %s", name, pod, exc)
                return  # try again next tick rather than risk two trainers
    trainer = _pick(holders, namespace, name, trainers_idx, None)
    await _start(rt, body, spec, name, namespace, trainer, patch)
    rt.event(body, "Warning", "TrainerMoved", f"worker {pod} lost the adapter; resumed on {trainer.pod}")


@kopf.timer(c.GROUP, c.VERSION, c.CLJOBS, interval=2.0, initial_delay=1.0)
async def cljob_sync(
    body: kopf.Body,
    spec: kopf.Spec,
    name: str,
    namespace: str,
    memo: kopf.Memo,
    annotations: kopf.Annotations,
    patch: kopf.Patch,
    trainers_idx: kopf.Index,
    **_: Any,
) -> None:
    rt: Runtime = memo.runtime
    found = await _recorded_trainer(rt, namespace, spec, annotations)
    if found is None:
        return
    pod, adapter, trainer = found
    if trainer is None:
        await _recover(rt, body, spec, name, namespace, pod, adapter, trainers_idx, patch)
        return
    try:
        st = await trainer.client.get(f"/v1/training/jobs/{name}")
    except WorkerError as exc:
        if exc.status == 404:  # the worker process restarted and serves the adapter again: it resumes the job
            await _start(rt, body, spec, name, namespace, trainer, patch)
            rt.event(body, "Warning", "TrainerRestarted", f"worker {pod} lost the job; resumed there")
            return
        log.info("job %s status unavailable: %s", name, exc)
        return
    status = training.job_status(st)
    fallback = training.placement_fallback(body.get("status") or {}, st)
    if fallback:
        rt.event(body, "Warning", "CoServingFallback", fallback)
    for refusal in training.new_refusals(body.get("status") or {}, st):
        rt.event(body, "Warning", "VersionRefused", refusal)
    latency = training.latency_condition((body.get("status") or {}).get("conditions"), st)
    if latency is not None and latency.flipped:
        if latency.met:
            rt.event(body, "Normal", "LatencyTargetMet", latency.message)
        else:
            rt.event(body, "Warning", "LatencyTargetMissed", latency.message)
    latest = training.latest_published(st)
    if latest is not None:
        version, path = latest
        notes = adapter["metadata"].get("annotations") or {}
        versions = training.merge_published(published_versions(adapter), st)
        if notes.get(c.ANNOT_PUBLISHED_SOURCE) != path or versions != published_versions(adapter):
            # Durable in the adapter's metadata: the fleet reloads every other replica in place and loads this
            # version on new replicas, also after an operator restart or once the job is gone; `spec.version`
            # pins pick their path from the version index.
            new = {
                c.ANNOT_PUBLISHED_SOURCE: path,
                c.ANNOT_PUBLISHED_VERSION: version,
                c.ANNOT_PUBLISHED_VERSIONS: json.dumps(versions, sort_keys=True),
            }
            await rt.kube.patch_cr(c.ADAPTERS, namespace, spec["adapter"], {"metadata": {"annotations": new}})
            rt.event(body, "Normal", "Published", f"version {version} ({path}) rolls out to every replica")
            rt.wake(namespace, str((adapter.get("spec") or {}).get("baseModel")))
    await _set_status(
        rt,
        namespace,
        name,
        body,
        status,
        status["phase"] in ("Running", "Succeeded"),
        "Training",
        f"{status['steps']} steps on {pod}",
        latency,
    )


@kopf.on.delete(c.GROUP, c.VERSION, c.CLJOBS)
async def cljob_stop(
    body: kopf.Body,
    spec: kopf.Spec,
    name: str,
    namespace: str,
    memo: kopf.Memo,
    annotations: kopf.Annotations,
    **_: Any,
) -> None:
    rt: Runtime = memo.runtime
    found = await _recorded_trainer(rt, namespace, spec, annotations)
    if found is None or found[2] is None:
        return
    pod, _, trainer = found
    try:
        await trainer.client.request("DELETE", f"/v1/training/jobs/{name}")
    except WorkerError as exc:
        if exc.status != 404:
            raise kopf.TemporaryError(exc.message, delay=2) from exc
    await rt.kube.patch_cr(
        c.ADAPTERS, namespace, spec["adapter"], {"metadata": {"annotations": {c.ANNOT_TRAINER_POD: None}}}
    )
    rt.event(body, "Normal", "Stopped", f"training stopped on {pod}; published versions keep serving")
