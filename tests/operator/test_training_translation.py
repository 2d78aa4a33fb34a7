"""CR spec ↔ worker training API (docs/training-api.md): exact field mapping, since the worker rejects unknown keys."""

from __future__ import annotations

from pathlib import Path

import yaml
from lorafleet.operator import training

ROOT = Path(__file__).resolve().parents[2]


def test_sample_job_translates_to_the_worker_api() -> None:
    sample = yaml.safe_load((ROOT / "manifests/samples/continuallearningjob.yaml").read_text())
    req = training.job_request("support-en-online", sample["spec"])
    assert req == {
        "name": "support-en-online",
        "adapter": "support-en",
        "mode": "coserve",
        "feedback": {"kinds": ["accept", "correction", "pair", "reward"], "minReward": 0.5},
        "optimizer": {"lr": 0.0002, "weightDecay": 0.01, "betas": [0.9, 0.999], "gradAccumulation": 4},
        "lora": {"rank": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "publish": {"everySteps": 50, "onHeldoutImprovement": True, "minImprovement": 0.01},
        "checkpoint": {"everySteps": 25, "keep": 3},
        "replayRatio": 0.2,
        "maxActivationStaleness": 4,
        "stalePolicy": "recompute",
        "minFinetuneShare": 0.05,
        "coServing": {"placement": "serving", "servingSMs": 16},
        "latencyTarget": {"tpotMs": 50.0},
    }
    # the worker's own request model (strict: unknown keys are refused) accepts exactly what the operator sends
    from lorafleet.worker.training.spec import JobRequest

    accepted = JobRequest.model_validate(req)
    assert (accepted.checkpoint.everySteps, accepted.checkpoint.keep) == (25, 3)
    co = training.job_request("j", {"adapter": "a", "coServing": {"placement": "partition", "servingSMs": 24}})
    assert co["coServing"] == {"placement": "partition", "servingSMs": 24}
    spec = JobRequest.model_validate(co).to_spec()
    assert (spec.placement, spec.serving_sms) == ("partition", 24)
    assert JobRequest.model_validate(req).to_spec().placement == "serving"  # the default: never overlap serving
    assert JobRequest.model_validate(req).to_spec().tpot_percentile == 99.0  # the default percentile
    lat = training.job_request("j", {"adapter": "a", "latencyTarget": {"tpotMillis": 40, "percentile": 95}})
    assert lat["latencyTarget"] == {"tpotMs": 40.0, "percentile": 95.0}
    assert JobRequest.model_validate(lat).to_spec().tpot_percentile == 95.0
    assert training.job_request("j", {"adapter": "a", "feedback": {"accept": False}})["feedback"] == {
        "kinds": ["correction", "pair", "reward"]
    }


def test_status_is_bounded_and_latest_version_found() -> None:
    pvs = [{"version": v, "step": v * 10, "path": f"/s/a/v{v}", "publishedAt": "t", "loss": 1.0} for v in range(1, 31)]
    st = {"phase": "Running", "steps": 300, "tokensTrained": 5000, "loss": 0.5, "publishedVersions": pvs}
    out = training.job_status(st)
    assert out["phase"] == "Running" and out["steps"] == 300 and out["loss"] == 0.5
    assert len(out["publishedVersions"]) == 20 and out["publishedVersions"][-1] == {
        "version": "30",
        "step": 300,
        "publishedAt": "t",
    }
    assert training.latest_published(st) == ("30", "/s/a/v30")
    assert training.latest_published({"publishedVersions": []}) is None
    assert "coServing" not in out and "finetuneShare" not in out
    seen = training.job_status({"phase": "Running", "share": 0.42, "coServing": {"placement": "partition",
                                                                                 "effective": "beside"},
                                "latency": {"aim": 1.02, "observedRatio": 0.912345678}})  # fmt: skip
    assert (seen["finetuneShare"], seen["coServing"], seen["tpotRatio"]) == (0.42, "beside", 0.9123)
    assert "tpotRatio" not in training.job_status({"phase": "Running", "latency": {"observedRatio": None}})
    from lorafleet.crds import ContinualLearningJobStatus

    ContinualLearningJobStatus.model_validate(seen)  # within the CRD's status schema
    assert training.job_status({"phase": "Stopped"})["phase"] == "Succeeded"


def test_placement_fallback_is_reported_once_per_change() -> None:
    why = "another job's training rows ride this worker's serving steps: running between them"
    st = {"phase": "Running", "coServing": {"placement": "fused", "effective": "serving", "reason": why}}
    note = training.placement_fallback({"coServing": None}, st)
    assert note == f"coServing.placement fused runs as serving: {why}"
    assert training.placement_fallback({"coServing": "serving"}, st) is None  # already shown: no repeat
    assert training.placement_fallback({"coServing": "fused"}, st) == note  # the placement in effect changed
    asked = {"phase": "Running", "coServing": {"placement": "fused", "effective": "fused"}}
    assert training.placement_fallback({}, asked) is None
    assert training.placement_fallback({}, {"phase": "Running"}) is None
    assert training.job_status({"phase": "Succeeded"})["phase"] == "Succeeded"


def test_crd_bounds_are_what_the_worker_accepts() -> None:
    """A job the API server admits must never be refused by the worker (422) for a bound the CRD did not enforce."""
    from lorafleet.worker.training.spec import JobRequest

    crd = yaml.safe_load((ROOT / "crds/lorafleet.io_continuallearningjobs.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    worker = JobRequest.model_json_schema()
    assert spec["replayRatio"]["maximum"] == worker["properties"]["replayRatio"]["maximum"] == 0.9
    ckpt = worker["$defs"]["CheckpointSpec"]["properties"]
    assert spec["checkpoint"]["properties"]["keep"]["maximum"] == ckpt["keep"]["maximum"]
    assert spec["checkpoint"]["properties"]["everySteps"]["minimum"] == ckpt["everySteps"]["minimum"]
    co, wco = spec["coServing"]["properties"], worker["$defs"]["CoServingSpec"]["properties"]
    from lorafleet.worker.training.graphed import PLACEMENTS
    from lorafleet.worker.training.spec import NOT_OFFERED

    # the CRD admits exactly the placements the worker runs; the ones it refuses, it refuses with a reason
    (rule,) = co["placement"]["x-kubernetes-validations"]
    assert rule["rule"] == "self in [" + ", ".join(f"'{p}'" for p in PLACEMENTS) + "]"
    assert PLACEMENTS == ("serving", "partition") and all(p in rule["message"] for p in NOT_OFFERED)
    assert wco["placement"]["default"] == co["placement"]["default"] == "serving"
    assert (co["servingSMs"]["minimum"], co["servingSMs"]["maximum"]) == (wco["servingSMs"]["minimum"], 1024)
    assert wco["servingSMs"]["maximum"] == 1024
    gate, wgate = spec["publish"]["properties"]["minImprovement"], worker["$defs"]["PublishSpec"]["properties"]
    assert (gate["maximum"], gate.get("exclusiveMaximum")) == (wgate["minImprovement"]["exclusiveMaximum"], True)


def test_trainer_choice_keeps_the_recorded_pod_then_spreads_jobs() -> None:
    pods = [("w-0", False, 1, 0.0), ("w-1", False, 0, 9.0), ("w-2", True, 0, 0.0), ("w-3", False, 0, 2.0)]
    assert training.choose_trainer(pods) == "w-3"  # not draining, no job yet, less traffic than w-1
    assert training.choose_trainer(pods, recorded="w-0") == "w-0"  # a resumed job stays where it runs
    assert training.choose_trainer(pods, recorded="gone") == "w-3"  # the recorded pod no longer holds it
    assert training.choose_trainer([("w-1", False, 0, 1.0), ("w-0", False, 0, 1.0)]) == "w-0"  # stable by name
    assert training.choose_trainer([("w-2", True, 0, 0.0)]) == "w-2"  # draining beats not training at all
    assert training.choose_trainer([]) is None


def test_latency_condition_turns_false_on_a_miss_and_true_only_well_under_the_target() -> None:
    def worker(ratio):
        return {"latency": {"targetMs": 50.0, "percentile": 99.0, "aim": 0.8, "observedRatio": ratio}}

    def cond(result):
        met, reason, message, _ = result
        return [{"type": training.LATENCY_CONDITION, "status": "True" if met else "False", "reason": reason}]

    assert training.latency_condition(None, {"latency": {"observedRatio": None}}) is None  # no decision yet
    first = training.latency_condition(None, worker(0.9))
    assert first is not None and first[:2] == (True, "TargetHeld") and first[3] is False  # no event for the start
    assert first[2] == "p99 TPOT is 0.90x the 50 ms target"
    missed = training.latency_condition(cond(first), worker(1.07))
    assert missed is not None and (missed[0], missed[1], missed[3]) == (False, "TargetMissed", True)
    assert missed[2].startswith("p99 TPOT is 1.07x the 50 ms target; fine-tuning backs off (aim 0.80x)")
    still = training.latency_condition(cond(missed), worker(0.98))  # under 1.0 but not well under: still missed
    assert still is not None and (still[0], still[3]) == (False, False)
    back = training.latency_condition(cond(still), worker(0.93))
    assert back is not None and (back[0], back[1], back[3]) == (True, "TargetHeld", True)
    assert training.latency_condition(None, worker(1.2))[3] is True  # a first report that misses: a Warning
    from lorafleet.crds import Condition

    for result in (first, missed, back):
        Condition.model_validate({**cond(result)[0], "message": result[2]})  # within the CRD's condition schema


def test_refused_candidates_reach_the_status_and_one_event_each() -> None:
    why = "no held-out improvement: 2.5 >= 2.1 (the serving version's 2.1)"
    worker = {
        "phase": "Running",
        "refusedVersions": [{"step": s, "reason": why, "heldoutLoss": 2.5, "servingHeldoutLoss": 2.1} for s in (10, 20)]
        + [{"step": 30, "reason": "loss spike: 9 > 2 x 3", "heldoutLoss": float("nan")}],
    }
    out = training.job_status(worker)
    assert out["refusedVersions"] == [
        {"step": 10, "reason": why, "heldoutLoss": 2.5, "servingHeldoutLoss": 2.1},
        {"step": 20, "reason": why, "heldoutLoss": 2.5, "servingHeldoutLoss": 2.1},
        {"step": 30, "reason": "loss spike: 9 > 2 x 3"},  # a NaN is no JSON number: left out
    ]
    from lorafleet.crds import ContinualLearningJobStatus

    ContinualLearningJobStatus.model_validate(out)  # within the CRD's status schema
    many = {"refusedVersions": [{"step": s, "reason": "x" * 999} for s in range(12)]}
    bounded = training.job_status(many)["refusedVersions"]
    assert [r["step"] for r in bounded] == [7, 8, 9, 10, 11] and len(bounded[0]["reason"]) == 256
    assert "refusedVersions" not in training.job_status({"phase": "Running"})
    events = training.new_refusals({}, worker)
    assert events[0] == f"candidate at step 10 not published, the serving version keeps serving: {why}"
    assert len(events) == 3
    assert training.new_refusals({"refusedVersions": out["refusedVersions"][:2]}, worker) == [
        "candidate at step 30 not published, the serving version keeps serving: loss spike: 9 > 2 x 3"
    ]
    assert training.new_refusals(out, worker) == []  # already shown: no repeat on the next sync
    gate = training.job_request(
        "j", {"adapter": "a", "publish": {"onHeldoutImprovement": True, "minImprovement": 0.02}}
    )
    assert gate["publish"] == {"onHeldoutImprovement": True, "minImprovement": 0.02}
    from lorafleet.worker.training.spec import JobRequest

    assert JobRequest.model_validate(gate).to_spec().publish.min_improvement == 0.02
