"""The whole lifecycle against a real API server, real KWOK pods and real CPU worker processes.

The tests run in file order and share one fleet (one namespace, one operator subprocess, one BaseModel with two
workers), because starting workers is the expensive part on 2 cores. Each test states one behaviour.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from lorafleet.operator import constants as c
from lorafleet.operator import resources as res

from lorafleet.local.harness import LocalFleet, StreamingRouter, wait_for
from lorafleet.local.samples import adapter, basemodel

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]

BM = "tiny"
ADAPTERS = ("ada", "bob", "cat")


def routed(fleet: LocalFleet, name: str, n: int = 1) -> list[tuple[str, str]]:
    routes = fleet.routes(name)
    return routes if len(routes) >= n else []


def test_basemodel_creates_owned_children_and_workers_become_ready(fleet: LocalFleet, tiny_assets) -> None:
    fleet.create(c.BASEMODELS, basemodel(BM, tiny_assets["model"], replicas=2))
    bm = fleet.get(c.BASEMODELS, BM)
    uid = bm["metadata"]["uid"]
    dep = wait_for(lambda: fleet.apps.read_namespaced_deployment(res.worker_name(BM), fleet.namespace), 30)
    assert dep.metadata.owner_references[0].uid == uid
    svc = wait_for(lambda: fleet.core.read_namespaced_service(res.worker_name(BM), fleet.namespace), 30)
    assert svc.metadata.owner_references[0].uid == uid
    pdb = wait_for(lambda: fleet.policy.read_namespaced_pod_disruption_budget(res.worker_name(BM), fleet.namespace), 30)
    assert pdb.metadata.owner_references[0].uid == uid and pdb.spec.max_unavailable == 1
    secret = wait_for(lambda: fleet.core.read_namespaced_secret(res.admin_secret_name(BM), fleet.namespace), 30)
    assert len(secret.data["token"]) > 40
    args = dep.spec.template.spec.containers[0].args
    assert args[args.index("--admin-token-file") + 1] == "/var/run/lorafleet/admin/token"
    wait_for(lambda: (fleet.get(c.BASEMODELS, BM).get("status") or {}).get("readyWorkers") == 2, 180, 0.5, "2 workers")
    status = fleet.get(c.BASEMODELS, BM)["status"]
    assert status["observedGeneration"] == bm["metadata"]["generation"]
    assert {w["pod"] for w in status["workers"]} == {p.metadata.name for p in fleet.worker_pods(BM)}
    assert fleet.condition(c.BASEMODELS, BM, "Ready")["status"] == "True"
    assert "finalizers" in bm["metadata"] or fleet.get(c.BASEMODELS, BM)["metadata"].get("finalizers")


def test_adapters_are_placed_loaded_routed_and_complete(fleet: LocalFleet, tiny_assets) -> None:
    t0 = time.monotonic()
    fleet.create(c.ADAPTERS, adapter("ada", BM, tiny_assets["r4"], replicas=1))
    fleet.create(c.ADAPTERS, adapter("bob", BM, tiny_assets["r8"], replicas=2))
    fleet.create(c.ADAPTERS, adapter("cat", BM, tiny_assets["r16"], replicas=1))
    token = fleet.admin_token(BM)
    for name, n in (("ada", 1), ("bob", 2), ("cat", 1)):
        routes = wait_for(lambda name=name, n=n: routed(fleet, name, n), 30, 0.1, f"{name} routed")
        assert len(routes) == n
        # every routed pod really holds the adapter, and a completion through each works
        for _pod, ep in routes:
            assert name in fleet.worker_adapters(ep, token)
            r = fleet.complete(name, ep)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == name
        obj = wait_for(
            lambda name=name, n=n: (
                (o := fleet.get(c.ADAPTERS, name)) and len(o["status"].get("placements", [])) == n and o
            ),
            15,
        )
        assert sorted(p["pod"] for p in obj["status"]["placements"]) == sorted(p for p, _ in routes)
        assert obj["status"]["phase"] == "Ready"
        assert fleet.condition(c.ADAPTERS, name, "Ready")["status"] == "True"
        assert fleet.condition(c.ADAPTERS, name, "Placed")["status"] == "True"
        # headless Service with no selector, owned by the adapter
        svc = fleet.core.read_namespaced_service(res.adapter_route_name(name), fleet.namespace)
        assert svc.spec.cluster_ip == "None" and not svc.spec.selector
        assert svc.metadata.owner_references[0].uid == obj["metadata"]["uid"]
    bob_pods = [p for p, _ in fleet.routes("bob")]
    nodes = {p.spec.node_name for p in fleet.worker_pods(BM) if p.metadata.name in bob_pods}
    assert len(nodes) == 2  # replicas spread across nodes
    assert time.monotonic() - t0 < 30
    reasons = {e.reason for e in fleet.events_for("ada")}
    assert "Loaded" in reasons


def test_scale_adapter_replicas_up_and_down(fleet: LocalFleet) -> None:
    fleet.patch(c.ADAPTERS, "ada", {"spec": {"replicas": {"min": 2}}})
    routes = wait_for(lambda: routed(fleet, "ada", 2), 30, 0.1, "ada on 2 workers")
    token = fleet.admin_token(BM)
    assert all("ada" in fleet.worker_adapters(ep, token) for _, ep in routes)
    fleet.patch(c.ADAPTERS, "ada", {"spec": {"replicas": {"min": 1}}})
    wait_for(lambda: len(fleet.routes("ada")) == 1, 30, 0.1, "ada back to 1")
    # the dropped replica is drained and unloaded, not just un-routed
    eps = fleet.pod_endpoints()
    wait_for(lambda: sum("ada" in fleet.worker_adapters(ep, token) for ep in eps.values()) == 1, 30, 0.2, "unload")


def test_migration_under_a_request_stream_drops_nothing(fleet: LocalFleet) -> None:
    token = fleet.admin_token(BM)
    ((source, source_ep),) = fleet.routes("cat")
    with StreamingRouter(fleet, "cat", concurrency=2) as stream:
        wait_for(lambda: stream.ok >= 5, 30, 0.1, "stream warmed up")
        # drain the source worker: every adapter it holds moves by safe handoff
        fleet.core.patch_namespaced_pod(
            source, fleet.namespace, {"metadata": {"annotations": {"lorafleet.io/drain": "true"}}}
        )
        wait_for(lambda: (r := fleet.routes("cat")) and r[0][0] != source, 30, 0.1, "cat moved")
        wait_for(lambda: "cat" not in fleet.worker_adapters(source_ep, token), 30, 0.1, "cat unloaded from source")
        before = stream.ok
        wait_for(lambda: stream.ok >= before + 5, 30, 0.1, "stream continues on the target")
    assert stream.failed == [], stream.failed[:5]
    assert len(stream.served_by) == 2 and stream.ok > 10
    assert fleet.operator_metric("lorafleet_operator_migrations_total") >= 1
    fleet.core.patch_namespaced_pod(
        source, fleet.namespace, {"metadata": {"annotations": {"lorafleet.io/drain": None}}}
    )


def test_deleted_worker_pod_adapters_move_within_seconds(fleet: LocalFleet) -> None:
    pods = {p for p, _ in fleet.routes("ada")}
    victim = next(iter(pods))
    held = [a for a in ADAPTERS if victim in {p for p, _ in fleet.routes(a)}]
    t0 = time.monotonic()
    fleet.core.delete_namespaced_pod(victim, fleet.namespace, grace_period_seconds=0)
    for name in held:
        routes = wait_for(
            lambda name=name: (r := fleet.routes(name)) and all(p != victim for p, _ in r) and r,
            20,
            0.1,
            f"{name} moved",
        )
        assert fleet.complete(name, routes[0][1]).status_code == 200
    elapsed = time.monotonic() - t0
    assert elapsed < 10, elapsed
    # the Deployment replaces the pod; the replacement becomes a ready worker and can take adapters again
    wait_for(lambda: (fleet.get(c.BASEMODELS, BM)["status"] or {}).get("readyWorkers") == 2, 120, 0.5, "replacement")
    wait_for(lambda: len(fleet.routes("bob")) == 2, 30, 0.2, "bob back to 2 replicas")


def test_new_source_is_rolled_out_in_place_to_every_replica(fleet: LocalFleet, tiny_assets) -> None:
    token = fleet.admin_token(BM)
    routes = fleet.routes("bob")
    assert len(routes) == 2
    before = {p: fleet.worker_adapters(ep, token)["bob"]["version"] for p, ep in routes}
    fleet.patch(c.ADAPTERS, "bob", {"spec": {"source": {"uri": f"file://{tiny_assets['r4']}"}}})
    for _, ep in routes:
        wait_for(lambda ep=ep: fleet.worker_adapters(ep, token)["bob"]["path"] == str(tiny_assets["r4"]), 30, 0.2)
        assert fleet.complete("bob", ep).status_code == 200
    after = {p: fleet.worker_adapters(ep, token)["bob"]["version"] for p, ep in routes}
    assert all(after[p] != before[p] for p in before)  # new weights, new version
    assert [p for p, _ in fleet.routes("bob")] == [p for p, _ in routes]  # same pods, nothing moved
    wait_for(lambda: any(e.reason == "Reloaded" for e in fleet.events_for("bob")), 20, 0.2, "Reloaded event")


def test_crashed_worker_process_is_routed_around_and_gets_adapters_back(fleet: LocalFleet) -> None:
    pod = fleet.routes("bob")[0][0]
    old_ep = fleet.pod_endpoints()[pod]
    held = [a for a in ADAPTERS if pod in {p for p, _ in fleet.routes(a)}]
    t0 = time.monotonic()
    assert fleet.shim.kill_worker(pod)  # SIGKILL, like an OOM kill; the pod object stays
    for name in held:
        wait_for(lambda name=name: pod not in {p for p, _ in fleet.routes(name)} and fleet.routes(name), 20, 0.1, name)
    assert time.monotonic() - t0 < 10
    # the shim restarts the container (new port, re-annotated); the empty worker gets its replicas back
    wait_for(lambda: fleet.pod_endpoints().get(pod) not in (None, old_ep), 120, 0.5, "worker restarted")
    wait_for(lambda: pod in {p for p, _ in fleet.routes("bob")}, 60, 0.2, "bob back on the restarted worker")


def test_operator_restart_rebuilds_state_without_duplicate_loads(fleet: LocalFleet) -> None:
    eps = fleet.pod_endpoints()
    loads_before = {pod: fleet.worker_api_loads(ep) for pod, ep in eps.items()}
    routes_before = {a: fleet.slice_pods(a) for a in ADAPTERS}
    fleet.stop_operator()
    fleet.start_operator()
    # wait until the new operator has run several full cycles
    wait_for(lambda: fleet.operator_metric("lorafleet_operator_reconcile_seconds_count") >= 6, 60, 0.5, "cycles")
    assert fleet.operator_metric("lorafleet_operator_adapter_loads_total") == 0
    assert {pod: fleet.worker_api_loads(ep) for pod, ep in eps.items()} == loads_before
    assert {a: fleet.slice_pods(a) for a in ADAPTERS} == routes_before


def test_continual_learning_job_trains_publishes_and_rolls_out(fleet: LocalFleet) -> None:
    fleet.patch(c.ADAPTERS, "ada", {"spec": {"replicas": {"min": 2}}})
    wait_for(lambda: len(fleet.routes("ada")) == 2, 30, 0.1, "ada on 2 workers")
    job = {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "ContinualLearningJob",
        "metadata": {"name": "ada-cl"},
        "spec": {
            "adapter": "ada",
            "mode": "colocated",
            "optimizer": {"learningRate": 0.001, "gradAccumulation": 1, "maxSteps": 4},
            "publish": {"everySteps": 2},
            "replayRatio": 0.0,
        },
    }
    fleet.create(c.CLJOBS, job)
    trainer = wait_for(
        lambda: ((fleet.get(c.CLJOBS, "ada-cl") or {}).get("metadata", {}).get("annotations") or {}).get(
            "lorafleet.io/trainer"
        ),
        30,
        0.2,
        "job started on a worker",
    )
    eps = fleet.pod_endpoints()
    token = fleet.admin_token(BM)

    def complete(i: int) -> int:  # served traffic on the trainer: its TPOT guard decides on these requests
        with httpx.Client(timeout=60) as http:
            body = {"model": "ada", "prompt": f"hello fleet {i}", "max_tokens": 6}
            return http.post(f"http://{eps[trainer]}/v1/completions", json=body).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(complete, range(24))) == {200}
    for i in range(12):
        body = {"adapter": "ada", "kind": "pair", "prompt": f"question {i} about the fleet", "completion": " paris"}
        r = fleet.http.post(
            f"http://{eps[trainer]}/v1/feedback", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        assert r.status_code == 202, r.text
    st = wait_for(
        lambda: (s := (fleet.get(c.CLJOBS, "ada-cl") or {}).get("status") or {}).get("publishedVersions") and s,
        120,
        0.5,
        "a published version in status",
    )
    assert st["steps"] >= 2 and st["tokensTrained"] > 0 and st["phase"] in ("Running", "Succeeded")
    assert st["coServing"] == "cpu" and 0.0 <= st["finetuneShare"] <= 1.0  # CPU workers: the pieces run eagerly
    # the latency target's report: the observed percentile / target, a condition, and a Warning if it is missed
    st = wait_for(
        lambda: (s := (fleet.get(c.CLJOBS, "ada-cl") or {}).get("status") or {}).get("tpotRatio") is not None and s,
        60,
        0.5,
        "the latency report in status",
    )
    latency = next(cond for cond in st["conditions"] if cond["type"] == "LatencyTargetMet")
    assert latency["status"] == ("True" if st["tpotRatio"] <= 1.0 else "False"), (st["tpotRatio"], latency)
    assert latency["message"].startswith("p99 TPOT is ") and "x the 50 ms target" in latency["message"]
    if latency["status"] == "False":
        assert any(e.reason == "LatencyTargetMissed" for e in fleet.events_for("ada-cl"))
    other = next(p for p, _ in fleet.routes("ada") if p != trainer)

    def rolled_out() -> dict | None:
        """The newest published version once the other replica serves it and the adapter's annotations name it.

        Read afresh on every poll: the job may publish again (step 4) while step 2's version rolls out, and the
        operator then rolls out the newer one instead.
        """
        worker_job = fleet.http.get(
            f"http://{eps[trainer]}/v1/training/jobs/ada-cl", headers={"Authorization": f"Bearer {token}"}
        ).json()
        newest = max(worker_job["publishedVersions"], key=lambda v: int(v["version"]))
        notes = fleet.get(c.ADAPTERS, "ada")["metadata"].get("annotations") or {}
        served = fleet.worker_adapters(eps[other], token)["ada"]["path"]
        same = served == newest["path"] and notes.get("lorafleet.io/published-source") == newest["path"]
        return newest if same and notes.get("lorafleet.io/trainer-pod") == trainer else None

    # the other replica switches to the published weights (in-place load of the new version)
    newest = wait_for(rolled_out, 60, 0.3, "rollout")
    assert any(e.reason == "Published" for e in fleet.events_for("ada-cl"))
    assert any(e.reason == "Reloaded" for e in fleet.events_for("ada"))
    assert fleet.complete("ada", eps[other]).status_code == 200
    # the trainer's pod is deleted: the operator starts the job on the other replica, which resumes it from the
    # newest checkpoint (shared adapter store); no finished step is lost, and the replacement pod does not resume it
    auth = {"Authorization": f"Bearer {token}"}
    killed = trainer
    fleet.core.delete_namespaced_pod(killed, fleet.namespace, grace_period_seconds=0)

    def resumed() -> tuple[str, dict] | None:
        notes = (fleet.get(c.CLJOBS, "ada-cl") or {}).get("metadata", {}).get("annotations") or {}
        ep = fleet.pod_endpoints().get(notes.get("lorafleet.io/trainer", ""))
        try:
            r = fleet.http.get(f"http://{ep}/v1/training/jobs/ada-cl", headers=auth, timeout=5) if ep else None
        except httpx.HTTPError:
            return None
        ok = r is not None and r.status_code == 200 and r.json()["checkpoint"]["restoredStep"] is not None
        return (notes["lorafleet.io/trainer"], r.json()) if ok else None

    trainer, again = wait_for(resumed, 120, 0.5, "the job resumed after its pod was deleted")
    assert trainer == other and again["checkpoint"]["restoredStep"] >= 2
    assert again["steps"] >= again["checkpoint"]["restoredStep"]
    assert {v["version"] for v in again["publishedVersions"]} >= {newest["version"]}  # versions kept
    wait_for(lambda: any(e.reason == "TrainerMoved" for e in fleet.events_for("ada-cl")), 20, 0.2, "TrainerMoved")
    wait_for(lambda: (fleet.get(c.BASEMODELS, BM)["status"] or {}).get("readyWorkers") == 2, 120, 0.5, "replacement")
    eps = fleet.pod_endpoints()
    replacement = next(p for p in eps if p not in (killed, other))
    jobs = fleet.http.get(f"http://{eps[replacement]}/v1/training/jobs", headers=auth).json()["jobs"]
    assert all(j["name"] != "ada-cl" for j in jobs)  # one trainer per job: the new pod resumes only its own
    fleet.delete(c.CLJOBS, "ada-cl")
    wait_for(lambda: fleet.get(c.CLJOBS, "ada-cl") is None, 30, 0.2, "job deleted")
    stopped = fleet.http.get(
        f"http://{eps[trainer]}/v1/training/jobs/ada-cl", headers={"Authorization": f"Bearer {token}"}
    )
    assert stopped.status_code == 404 or stopped.json()["phase"] == "Stopped"
    # the published version keeps serving after the job is gone; the trainer mark is cleared
    # (the resumed job may have published once more before it was deleted: a version at least as new as the one
    # rolled out above, which `again` lists unless it came after that snapshot)
    notes = fleet.get(c.ADAPTERS, "ada")["metadata"]["annotations"]
    known = {v["path"]: int(v["version"]) for v in again["publishedVersions"]} | {
        newest["path"]: int(newest["version"])
    }
    source = notes["lorafleet.io/published-source"]
    assert known.get(source, int(newest["version"])) >= int(newest["version"]), (source, known)
    assert source.startswith(newest["path"].rsplit("/", 1)[0]) and "lorafleet.io/trainer-pod" not in notes
    wait_for(lambda: len(fleet.routes("bob")) == 2, 30, 0.2, "bob back to 2 replicas")


def test_a_candidate_short_of_the_heldout_improvement_is_refused_not_rolled_out(fleet: LocalFleet) -> None:
    """The held-out gate through the operator: feedback whose completions are random word triples, a job whose gate
    asks for a 90% lower held-out loss than the serving version's after one step (below the triples' entropy, so no
    candidate can pass); the candidate is refused (status `refusedVersions` with both held-out losses, a
    `VersionRefused` Event) and never rolled out."""
    import random

    token = fleet.admin_token(BM)
    auth = {"Authorization": f"Bearer {token}"}
    holder = fleet.routes("cat")[0][1]
    served = {ep: fleet.worker_adapters(ep, token)["cat"]["path"] for _, ep in fleet.routes("cat")}
    before = (fleet.get(c.ADAPTERS, "cat")["metadata"].get("annotations") or {}).get("lorafleet.io/published-source")
    rng = random.Random(7)
    words = ["harbor", "lantern", "copper", "violet", "engine", "meadow", "signal", "pepper", "glacier", "tunnel"]
    for i in range(100):  # in the log before the job starts: it replays all of it (10% held out, by feedback id)
        body = {
            "adapter": "cat",
            "kind": "pair",
            "prompt": f"note {i}:",
            "completion": " " + " ".join(rng.sample(words, 3)),
        }
        r = fleet.http.post(f"http://{holder}/v1/feedback", json=body, headers=auth)
        assert r.status_code == 202, r.text
    job = {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "ContinualLearningJob",
        "metadata": {"name": "cat-gated"},
        "spec": {
            "adapter": "cat",
            "optimizer": {"learningRate": 1.0, "gradAccumulation": 4, "maxSteps": 1},
            "publish": {"everySteps": 1, "onHeldoutImprovement": True, "minImprovement": 0.9},
            "replayRatio": 0.0,
        },
    }
    fleet.create(c.CLJOBS, job)
    st = wait_for(
        lambda: (s := (fleet.get(c.CLJOBS, "cat-gated") or {}).get("status") or {}).get("refusedVersions") and s,
        120,
        0.5,
        "a refused candidate in status",
    )
    refused = st["refusedVersions"][0]
    assert refused["step"] == 1 and refused["reason"].startswith("no held-out improvement")
    assert refused["heldoutLoss"] >= 0.1 * refused["servingHeldoutLoss"] > 0  # what the gate refuses
    assert st["publishedVersions"] == []  # the job started from the adapter's own version and published nothing
    wait_for(lambda: any(e.reason == "VersionRefused" for e in fleet.events_for("cat-gated")), 30, 0.2, "the Event")
    notes = fleet.get(c.ADAPTERS, "cat")["metadata"].get("annotations") or {}
    assert notes.get("lorafleet.io/published-source") == before  # nothing to roll out
    assert {ep: fleet.worker_adapters(ep, token)["cat"]["path"] for ep in served} == served  # no replica reloaded
    fleet.delete(c.CLJOBS, "cat-gated")
    wait_for(lambda: fleet.get(c.CLJOBS, "cat-gated") is None, 30, 0.2, "job deleted")


def test_delete_adapter_drains_unloads_and_unroutes(fleet: LocalFleet) -> None:
    token = fleet.admin_token(BM)
    holders = [ep for _, ep in fleet.routes("bob")]
    assert holders
    fleet.delete(c.ADAPTERS, "bob")
    wait_for(lambda: fleet.get(c.ADAPTERS, "bob") is None, 30, 0.2, "finalizer released")
    assert all("bob" not in fleet.worker_adapters(ep, token) for ep in holders)
    assert fleet.slice_pods("bob") is None
    from kubernetes.client.rest import ApiException

    with pytest.raises(ApiException) as err:
        fleet.core.read_namespaced_service(res.adapter_route_name("bob"), fleet.namespace)
    assert err.value.status == 404
    assert fleet.complete("bob", holders[0]).status_code == 404


def _bad(fleet: LocalFleet, name: str, cond: str, reason: str, status: str = "False") -> None:
    got = wait_for(lambda: (c_ := fleet.condition(c.ADAPTERS, name, cond)) and c_["reason"] == reason and c_, 20, 0.2)
    assert got["status"] == status and got["message"]
    wait_for(lambda: any(e.reason == reason and e.type == "Warning" for e in fleet.events_for(name)), 20, 0.2, "event")


def test_bad_inputs_get_conditions_and_events(fleet: LocalFleet, tiny_assets) -> None:
    fleet.create(c.ADAPTERS, adapter("orphan", "no-such-model", tiny_assets["r4"]))
    fleet.create(c.ADAPTERS, adapter("missing-src", BM, "file:///nonexistent/adapter"))
    fleet.create(c.ADAPTERS, adapter("too-big", BM, tiny_assets["r32"]))  # maxRank is 16
    fleet.create(c.ADAPTERS, adapter("too-many", BM, tiny_assets["r4"], replicas=3))  # 2 workers
    fleet.create(c.ADAPTERS, adapter("remote-src", BM, "s3://no-such-bucket/adapters/x"))  # the worker says 400
    _bad(fleet, "orphan", "Ready", "BaseModelNotFound")
    _bad(fleet, "missing-src", "Ready", "SourceNotFound")
    _bad(fleet, "too-big", "Ready", "RankExceedsLimit")
    _bad(fleet, "too-many", "Degraded", "ReplicasExceedWorkers", status="True")
    _bad(fleet, "remote-src", "Ready", "LoadFailed")
    assert "HTTP 400" in fleet.condition(c.ADAPTERS, "remote-src", "Ready")["message"]
    assert fleet.slice_pods("missing-src") is None and fleet.slice_pods("too-big") is None
    wait_for(lambda: len(fleet.routes("too-many")) == 2, 30, 0.2, "serves with what exists")
    assert "3 replicas requested" in fleet.condition(c.ADAPTERS, "too-many", "Degraded")["message"]


def test_vllm_flavour_client_sees_adapters_through_vllm_endpoints_only(fleet: LocalFleet) -> None:
    """Our worker speaks vLLM's dynamic-LoRA subset, so the stock-vLLM client is exercised against a real server."""
    import asyncio

    from lorafleet.operator.workerclient import VLLMWorkerClient

    (pod, ep), *_ = fleet.routes("ada")
    token = fleet.admin_token(BM)

    async def run() -> list[str]:
        client = VLLMWorkerClient(f"http://{ep}", token)
        try:
            assert await client.ready()
            names = [a.name for a in await client.adapters()]
            await client.unload("not-loaded-anywhere")  # idempotent: "cannot be found" is success
            return names
        finally:
            await client.aclose()

    names = asyncio.run(run())
    assert "ada" in names and all(n != BM for n in names)


def test_rebalancer_moves_load_off_a_hot_worker_without_dropping_requests(fleet: LocalFleet, tiny_assets) -> None:
    """Load-driven migration: two busy adapters share one worker; the OR-Tools rebalancer spreads them."""
    pods = sorted(p.metadata.name for p in fleet.worker_pods(BM))
    hot, cold = pods[0], pods[1]
    fleet.core.patch_namespaced_pod(
        cold, fleet.namespace, {"metadata": {"annotations": {"lorafleet.io/drain": "true"}}}
    )
    for name in ("hot-x", "hot-y"):
        fleet.create(c.ADAPTERS, adapter(name, BM, tiny_assets["r8"], replicas=1))
    for name in ("hot-x", "hot-y"):
        wait_for(lambda name=name: [p for p, _ in fleet.routes(name)] == [hot], 30, 0.1, f"{name} on {hot}")
    fleet.core.patch_namespaced_pod(cold, fleet.namespace, {"metadata": {"annotations": {"lorafleet.io/drain": None}}})
    fleet.stop_operator()
    fleet.operator_args = ["--interval", "0.5", "--drain-grace", "0.5", "--rebalance-interval", "2"]
    fleet.start_operator()
    with StreamingRouter(fleet, "hot-x") as sx, StreamingRouter(fleet, "hot-y") as sy:
        wait_for(lambda: {fleet.routes("hot-x")[0][0], fleet.routes("hot-y")[0][0]} == {hot, cold}, 60, 0.2, "spread")
        before = (sx.ok, sy.ok)
        wait_for(lambda: sx.ok > before[0] + 3 and sy.ok > before[1] + 3, 30, 0.1, "streams continue")
    assert sx.failed == [] and sy.failed == [], (sx.failed[:3], sy.failed[:3])
    # the source replica is unloaded once its last in-flight request finished; then the handoff counts
    wait_for(
        lambda: fleet.operator_metric("lorafleet_operator_migrations_total", {"reason": "rebalance"}) >= 1, 30, 0.2
    )
    assert fleet.operator_metric("lorafleet_operator_solve_seconds_count", {"kind": "rebalance"}) >= 1
    placed = fleet.condition(c.BASEMODELS, BM, "Placed")
    assert "last rebalance" in placed["message"]


def test_auto_replicas_follow_the_measured_request_rate(fleet: LocalFleet, tiny_assets) -> None:
    fleet.stop_operator()
    fleet.operator_args = ["--interval", "0.5", "--drain-grace", "0.5", "--rebalance-interval", "0"]
    fleet.operator_args += ["--per-replica-rate", "0.5"]  # any steady stream needs two replicas
    fleet.start_operator()
    fleet.create(c.ADAPTERS, adapter("auto-z", BM, tiny_assets["r4"], replicas={"min": 1, "max": 2, "auto": True}))
    wait_for(lambda: len(fleet.routes("auto-z")) == 1, 30, 0.1, "one replica while idle")
    with StreamingRouter(fleet, "auto-z") as stream:
        wait_for(lambda: len(fleet.routes("auto-z")) == 2, 60, 0.2, "scaled to two on measured rate")
        before = stream.ok
        wait_for(lambda: stream.ok > before + 3, 30, 0.1, "stream continues")
    assert stream.failed == [], stream.failed[:3]
    assert (fleet.get(c.ADAPTERS, "auto-z")["status"]["requestRate"] or 0) > 0.5


def test_auto_replicas_shrink_when_the_rate_falls_without_flapping(fleet: LocalFleet, tiny_assets) -> None:
    """Up on a ~2 req/s stream, down (once, after --scale-down-delay) when it falls to ~0.1 req/s; the low stream
    keeps running through the scale-down and no request of either stream fails."""
    fleet.stop_operator()
    fleet.operator_args = ["--interval", "0.5", "--drain-grace", "0.5", "--rebalance-interval", "0"]
    fleet.operator_args += ["--per-replica-rate", "0.5", "--scale-down-delay", "3"]
    fleet.start_operator()
    fleet.create(c.ADAPTERS, adapter("auto-w", BM, tiny_assets["r4"], replicas={"min": 1, "max": 2, "auto": True}))
    wait_for(lambda: len(fleet.routes("auto-w")) == 1, 30, 0.1, "one replica while idle")
    history: list[int] = []
    peak_rate = [0.0]  # the highest rate status showed: the scale-up decision saw at least this much
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            n = len(fleet.routes("auto-w"))
            if not history or history[-1] != n:
                history.append(n)
            if len(history) < 3:  # still on the way up
                rate = fleet.get(c.ADAPTERS, "auto-w").get("status", {}).get("requestRate") or 0.0
                peak_rate[0] = max(peak_rate[0], float(rate))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with StreamingRouter(fleet, "auto-w", concurrency=1, pause=0.4) as fast:
            wait_for(lambda: len(fleet.routes("auto-w")) == 2, 60, 0.2, "scaled to two on the measured rate")
        with StreamingRouter(fleet, "auto-w", concurrency=1, pause=10.0) as slow:
            wait_for(lambda: len(fleet.routes("auto-w")) == 1, 120, 0.2, "scaled back to one as the rate decays")
            down_rate = fleet.get(c.ADAPTERS, "auto-w")["status"]["requestRate"]
            time.sleep(6)  # hysteresis: the low rate must not bring the replica straight back
            assert len(fleet.routes("auto-w")) == 1
    finally:
        stop.set()
        sampler.join(timeout=5)
    assert fast.failed == [] and slow.failed == [], (fast.failed[:3], slow.failed[:3])
    assert fast.ok > 3 and slow.ok >= 1
    assert history == [1, 2, 1], history  # one step up, one step down, no flapping
    # status rounds the rate to 0.1 req/s, so a rate just above one replica's 0.5 shows as 0.5; down is at or under
    # the 80 % band (0.4)
    assert peak_rate[0] >= 0.5 and down_rate <= 0.8 * 0.5, (peak_rate[0], down_rate)
    # the surplus replica was drained and unloaded (a removal, not a migration)
    wait_for(lambda: fleet.operator_metric("lorafleet_operator_adapter_unloads_total") >= 1, 30, 0.2, "unloaded")
    assert fleet.operator_metric("lorafleet_operator_migrations_total") == 0


def test_handoff_protocol_order_between_two_real_workers(fleet: LocalFleet, tiny_assets) -> None:
    """migration.Migrator.handoff, the path every fleet cycle takes, on an adapter the operator does not manage (no
    CR: the fleet leaves it alone): the target holds the adapter before routing names it, the source is unloaded
    only after routing dropped it and its in-flight requests finished, and no request fails."""
    import asyncio
    import threading

    import httpx
    from lorafleet.operator.metrics import OperatorMetrics
    from lorafleet.operator.migration import Load, Migrator, Release
    from lorafleet.operator.workerclient import WorkerClient

    token = fleet.admin_token(BM)
    (src_pod, src_ep), (dst_pod, dst_ep) = sorted(fleet.pod_endpoints().items())[:2]
    name, path = "manual-m", str(tiny_assets["r8"])
    body = {"metadata": {"name": name, "namespace": fleet.namespace}}
    steps: list[str] = []
    table = {"eps": [src_ep]}  # the routing table a gateway would read
    failures: list[str] = []
    ok = [0]
    stop = threading.Event()

    def stream() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                ep = table["eps"][ok[0] % len(table["eps"])]
                r = http.post(f"http://{ep}/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 4})
                if r.status_code == 200:
                    ok[0] += 1
                else:
                    failures.append(f"{ep}: {r.status_code}")

    async def run() -> None:
        src, dst = WorkerClient(f"http://{src_ep}", token), WorkerClient(f"http://{dst_ep}", token)
        events: list[tuple[str, str]] = []
        migrator = Migrator(
            "m", OperatorMetrics(), lambda b, t, r, m: events.append((r, m)), lambda: None, grace=0.2, timeout=30.0
        )
        await src.load(name, path)
        t = threading.Thread(target=stream, daemon=True)
        t.start()
        while ok[0] < 5:
            await asyncio.sleep(0.05)

        async def route(loaded: set[tuple[str, str]]) -> list[Release]:
            held = name in [a.name for a in await dst.adapters()]
            steps.append(f"route:{sorted(loaded)}:{'loaded' if held else 'MISSING'}")
            table["eps"] = [dst_ep]  # target in, source out: one write, as one EndpointSlice apply is
            return [Release(name, src_pod, src, "rebalance", body)]

        loaded = await migrator.handoff([Load(name, dst_pod, dst, path, body)], route)
        assert loaded == {(name, dst_pod)} and (name, src_pod) in migrator.drains
        await migrator.settled()
        steps.append(f"unloaded:{name not in [a.name for a in await src.adapters()]}")
        before = ok[0]
        while ok[0] < before + 5:
            await asyncio.sleep(0.05)
        stop.set()
        t.join(timeout=30)
        assert [r for r, _ in events] == ["Loaded", "Unloaded"], events
        assert "timed out" not in events[-1][1]
        await dst.unload(name)
        await src.aclose()
        await dst.aclose()

    asyncio.run(run())
    assert steps == [f"route:[('{name}', '{dst_pod}')]:loaded", "unloaded:True"]
    assert failures == [] and ok[0] >= 10


def test_deleting_the_basemodel_unroutes_its_adapters_and_collects_children(fleet: LocalFleet) -> None:
    fleet.delete(c.BASEMODELS, BM)
    wait_for(lambda: fleet.get(c.BASEMODELS, BM) is None, 30, 0.2, "finalizer released")
    for name in ("ada", "cat", "hot-x"):
        _bad(fleet, name, "Ready", "BaseModelNotFound")
        assert fleet.slice_pods(name) == []
    from kubernetes.client.rest import ApiException

    def gone() -> bool:
        try:
            fleet.apps.read_namespaced_deployment(res.worker_name(BM), fleet.namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(gone, 60, 0.5, "worker Deployment garbage-collected")
