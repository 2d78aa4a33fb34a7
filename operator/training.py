"""ContinualLearningJob, pure parts: CR spec → worker training-API request, worker job status → CR status, and
which replicas still serve an older version than the newest published one.

The worker API (docs/training-api.md) rejects unknown fields, so the translation is explicit and unit-tested;
CR fields without a worker counterpart (e.g. `lora.dropout`) are dropped here, not sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

MODES = {"colocated": "coserve"}
PHASES = {
    "Pending": "Pending",
    "Running": "Running",
    "Succeeded": "Succeeded",
    "Stopped": "Succeeded",
    "Failed": "Failed",
}
MAX_VERSIONS_IN_STATUS = 20
MAX_REFUSED_IN_STATUS = 5


def owning_job(jobs: list[tuple[str, str]], name: str) -> str | None:
    """The job that trains an adapter when several name it: the oldest (creationTimestamp, then name). Returns
    that job's name when it is not `name` (so `name` must be refused), else None."""
    if not jobs:
        return None
    first = min(jobs)[1]
    return first if first != name else None


def job_request(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    req: dict[str, Any] = {
        "name": name,
        "adapter": spec["adapter"],
        "mode": MODES.get(spec.get("mode", "colocated"), "coserve"),
    }
    fb = spec.get("feedback") or {}
    kinds = ["pair", "reward"]
    if fb.get("accept", True):
        kinds.append("accept")
    if fb.get("corrections", True):
        kinds.append("correction")
    req["feedback"] = {"kinds": sorted(kinds)}
    if fb.get("minReward") is not None:
        req["feedback"]["minReward"] = fb["minReward"]
    opt = spec.get("optimizer") or {}
    o: dict[str, Any] = {}
    for src, dst in (("learningRate", "lr"), ("weightDecay", "weightDecay"), ("betas", "betas"),
                     ("gradAccumulation", "gradAccumulation"), ("maxSteps", "maxSteps")):  # fmt: skip
        if opt.get(src) is not None:
            o[dst] = opt[src]
    if o:
        req["optimizer"] = o
    lora = spec.get("lora") or {}
    lo = {k: lora[k] for k in ("rank", "alpha") if lora.get(k) is not None}
    if lora.get("targetModules"):
        lo["targets"] = list(lora["targetModules"])
    if lo:
        req["lora"] = lo
    pub = spec.get("publish") or {}
    p = {k: pub[k] for k in ("everySteps", "onHeldoutImprovement", "minImprovement") if pub.get(k) is not None}
    if p:
        req["publish"] = p
    ckpt = {k: v for k, v in (spec.get("checkpoint") or {}).items() if k in ("everySteps", "keep") and v is not None}
    if ckpt:
        req["checkpoint"] = ckpt
    for key in ("replayRatio", "maxActivationStaleness", "stalePolicy", "minFinetuneShare"):
        if spec.get(key) is not None:
            req[key] = spec[key]
    co = {k: v for k, v in (spec.get("coServing") or {}).items() if k in ("placement", "servingSMs") and v is not None}
    if co:
        req["coServing"] = co
    target = spec.get("latencyTarget") or {}
    if target.get("tpotMillis") is not None:
        req["latencyTarget"] = {"tpotMs": float(target["tpotMillis"])}
        if target.get("percentile") is not None:
            req["latencyTarget"]["percentile"] = float(target["percentile"])
    return req


def job_status(worker_status: Mapping[str, Any]) -> dict[str, Any]:
    """CR status fields from the worker's job status (bounded: the newest versions only)."""
    versions = [
        {
            k: v
            for k, v in (
                ("version", str(pv.get("version"))),
                ("step", pv.get("step")),
                ("publishedAt", pv.get("publishedAt")),
                ("heldoutLoss", pv.get("heldoutLoss")),
            )
            if v is not None
        }  # fmt: skip
        for pv in worker_status.get("publishedVersions") or []
    ][-MAX_VERSIONS_IN_STATUS:]
    out: dict[str, Any] = {
        "phase": PHASES.get(str(worker_status.get("phase")), "Pending"),
        "steps": int(worker_status.get("steps") or 0),
        "tokensTrained": int(worker_status.get("tokensTrained") or 0),
        "publishedVersions": versions,
    }
    refused = refused_versions(worker_status)
    if refused:
        out["refusedVersions"] = refused
    if worker_status.get("loss") is not None:
        out["loss"] = float(worker_status["loss"])
    if worker_status.get("share") is not None:
        out["finetuneShare"] = min(1.0, max(0.0, float(worker_status["share"])))
    observed = (worker_status.get("latency") or {}).get("observedRatio")
    if observed is not None:
        out["tpotRatio"] = round(max(0.0, float(observed)), 4)
    effective = (worker_status.get("coServing") or {}).get("effective")
    if effective:
        out["coServing"] = str(effective)[:32]
    return out


def refused_versions(worker_status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The newest candidates the worker refused (NaN, loss spike, or the held-out gate: a candidate whose held-out
    loss does not beat the serving version's), bounded, as CR status entries."""
    out = []
    for r in (worker_status.get("refusedVersions") or [])[-MAX_REFUSED_IN_STATUS:]:
        entry: dict[str, Any] = {"step": int(r.get("step") or 0), "reason": str(r.get("reason") or "")[:256]}
        for key in ("heldoutLoss", "servingHeldoutLoss"):
            if isinstance(r.get(key), int | float) and math.isfinite(r[key]):
                entry[key] = float(r[key])
        out.append(entry)
    return out


def new_refusals(cr_status: Mapping[str, Any], worker_status: Mapping[str, Any]) -> list[str]:
    """Event messages for the refused candidates the CR status does not show yet (steps after its newest refusal):
    one Warning per refusal, however often the status is synced."""
    shown = [int(r.get("step") or 0) for r in cr_status.get("refusedVersions") or []]
    after = max(shown) if shown else -1
    return [
        f"candidate at step {r['step']} not published, the serving version keeps serving: {r['reason']}"
        for r in refused_versions(worker_status)
        if r["step"] > after
    ]


def choose_trainer(candidates: list[tuple[str, bool, int, float]], recorded: str | None = None) -> str | None:
    """The pod to train on among the adapter's holders, each (pod, draining, jobs already training there, request
    rate): the recorded trainer while it still holds the adapter (a resumed job never starts a second copy
    elsewhere), else a pod not draining, with the fewest jobs (one job's rows ride a worker's serving steps; jobs
    also share its GPU), then the least traffic, then by name (stable across retries)."""
    if recorded is not None and any(pod == recorded for pod, *_ in candidates):
        return recorded
    ranked = sorted(candidates, key=lambda c: (c[1], c[2], c[3], c[0]))
    return ranked[0][0] if ranked else None


def placement_fallback(cr_status: Mapping[str, Any], worker_status: Mapping[str, Any]) -> str | None:
    """The Warning to emit when the worker starts running a job elsewhere than its spec asks (a `partition` without
    green contexts, a second `fused` job on a worker, too little GPU memory for `fused`), once per change of the
    placement in effect: the CR status shows where it runs, the Event says why."""
    co = worker_status.get("coServing") or {}
    asked, effective, why = co.get("placement"), co.get("effective"), co.get("reason")
    if not why or not effective or effective == asked or cr_status.get("coServing") == str(effective)[:32]:
        return None
    return f"coServing.placement {asked} runs as {effective}: {why}"


LATENCY_CONDITION = "LatencyTargetMet"
LATENCY_RECOVERED = 0.95  # a missed target counts as met again at or under this ratio (no flapping around 1.0)


class LatencyCondition(NamedTuple):
    met: bool
    reason: str
    message: str
    flipped: bool  # the condition changed: an Event is due


def latency_condition(
    conditions: list[Mapping[str, Any]] | None, worker_status: Mapping[str, Any]
) -> LatencyCondition | None:
    """(met, reason, message, flipped) for the `LatencyTargetMet` condition from the worker's latency report, or
    None while the worker has none (no decision yet). It turns False once the target's percentile of per-request
    TPOT is over the target, and True again only at <= 0.95x of it, so a job riding the target does not flap;
    `flipped` says an Event is due (a Warning when it turns False, a Normal event when it recovers)."""
    lat = worker_status.get("latency") or {}
    ratio = lat.get("observedRatio")
    if ratio is None:
        return None
    ratio = float(ratio)
    prev = next((cond for cond in conditions or [] if cond.get("type") == LATENCY_CONDITION), None)
    was_met = prev is None or prev.get("status") == "True"
    met = ratio <= 1.0 if was_met else ratio <= LATENCY_RECOVERED
    pct = float(lat.get("percentile") or 99.0)
    what = f"p{pct:g} TPOT is {ratio:.2f}x the {float(lat.get('targetMs') or 0):g} ms target"
    if met:
        return LatencyCondition(True, "TargetHeld", what, prev is not None and not was_met)
    aim = lat.get("aim")
    why = f"{what}; fine-tuning backs off" + (f" (aim {float(aim):.2f}x)" if aim is not None else "")
    return LatencyCondition(False, "TargetMissed", why + ", down to minFinetuneShare while it misses", was_met)


def latest_published(worker_status: Mapping[str, Any]) -> tuple[str, str] | None:
    """(version, path) of the newest published version, if any."""
    pvs = [pv for pv in worker_status.get("publishedVersions") or [] if pv.get("path")]
    if not pvs:
        return None
    pv = max(pvs, key=lambda p: int(p.get("version") or 0))
    return str(pv["version"]), str(pv["path"])


def merge_published(known: Mapping[str, str], job_status: Mapping[str, Any]) -> dict[str, str]:
    """The version index kept on the adapter: what it had plus what the job publishes now, newest 20."""
    merged = dict(known)
    for pv in job_status.get("publishedVersions") or []:
        if pv.get("version") is not None and pv.get("path"):
            merged[str(pv["version"])] = str(pv["path"])
    newest = sorted(merged, key=lambda v: (int(v) if v.isdigit() else -1, v))[-MAX_VERSIONS_IN_STATUS:]
    return {v: merged[v] for v in newest}
