"""Level-triggered repair of everything the operator owns, against a real API server and real worker processes.

Each test changes one owned object behind the operator's back (delete, scale, edit, foreign endpoint, removed label)
and asserts it converges back within 30 s with the operator still the same process (no restart). The engine switch
checks that server-side apply removes fields that leave the desired state.
"""

from __future__ import annotations

import time

import pytest
from kubernetes.client.rest import ApiException
from lorafleet.operator import constants as c
from lorafleet.operator import resources as res

from lorafleet.local.harness import LocalFleet, wait_for
from lorafleet.local.samples import adapter, basemodel

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

BM = "drifty"
AD = "drift-a"
REPAIR = 30.0


def _deployment(fleet: LocalFleet, name: str = BM):
    return fleet.apps.read_namespaced_deployment(res.worker_name(name), fleet.namespace)


def _gone(fn) -> bool:
    try:
        fn()
    except ApiException as exc:
        return exc.status == 404
    return False


@pytest.fixture(scope="module")
def served(fleet: LocalFleet, tiny_assets) -> LocalFleet:
    fleet.create(c.BASEMODELS, basemodel(BM, tiny_assets["model"], replicas=1))
    fleet.create(c.ADAPTERS, adapter(AD, BM, tiny_assets["r4"], replicas=1))
    wait_for(lambda: fleet.routes(AD), 180, 0.3, "adapter routed")
    return fleet


def _served_by_live_pods(fleet: LocalFleet) -> bool:
    """Every pod the route lists is a running worker (not one being deleted) and a completion through it succeeds:
    `serves` alone also counts a terminating pod the slice still lists while its drain runs."""
    live = {p.metadata.name for p in fleet.worker_pods(BM)}
    return all(pod in live for pod, _ in fleet.routes(AD)) and fleet.serves(AD)


def test_children_are_server_side_applied_by_one_manager(served: LocalFleet) -> None:
    dep = _deployment(served)
    managers = {(m.manager, m.operation) for m in dep.metadata.managed_fields}
    assert ("lorafleet-operator", "Apply") in managers
    assert not any(m == "lorafleet-operator" and op == "Update" for m, op in managers)
    sl = served.discovery.read_namespaced_endpoint_slice(res.adapter_route_name(AD), served.namespace)
    assert {(m.manager, m.operation) for m in sl.metadata.managed_fields} == {("lorafleet-operator", "Apply")}


def test_hand_scaled_deployment_returns_to_the_basemodel_count(served: LocalFleet) -> None:
    pid = served.operator.pid
    name = res.worker_name(BM)
    served.apps.patch_namespaced_deployment_scale(name, served.namespace, {"spec": {"replicas": 3}})
    t0 = time.monotonic()
    wait_for(lambda: _deployment(served).spec.replicas == 1, REPAIR, 0.1, "replicas back to 1")
    assert time.monotonic() - t0 < REPAIR
    wait_for(lambda: len(served.worker_pods(BM)) == 1, 60, 0.3, "surplus pods removed")
    assert served.serves(AD) and served.operator.pid == pid and served.operator.poll() is None


def test_removed_label_comes_back(served: LocalFleet) -> None:
    name = res.worker_name(BM)
    served.apps.patch_namespaced_deployment(
        name, served.namespace, {"metadata": {"labels": {c.LABEL_MANAGED_BY: None}}}
    )
    wait_for(lambda: (_deployment(served).metadata.labels or {}).get(c.LABEL_MANAGED_BY) == c.MANAGER, REPAIR, 0.1)
    route = res.adapter_route_name(AD)
    served.discovery.patch_namespaced_endpoint_slice(
        route, served.namespace, {"metadata": {"labels": {c.LABEL_COMPONENT: None}}}
    )

    def labelled() -> bool:
        sl = served.discovery.read_namespaced_endpoint_slice(route, served.namespace)
        return (sl.metadata.labels or {}).get(c.LABEL_COMPONENT) == c.COMPONENT_ROUTE

    wait_for(labelled, REPAIR, 0.1, "slice label back")


def test_foreign_endpoint_is_removed(served: LocalFleet) -> None:
    route = res.adapter_route_name(AD)
    before = served.slice_pods(AD)
    sl = served.discovery.read_namespaced_endpoint_slice(route, served.namespace)
    foreign = {
        "addresses": ["10.99.0.9"],
        "conditions": {"ready": True},
        "targetRef": {"kind": "Pod", "name": "intruder"},
    }
    body = {"endpoints": [*served.discovery.api_client.sanitize_for_serialization(sl.endpoints), foreign]}
    # the API server's answer proves the foreign write landed; a read afterwards may already see the repair
    landed = served.discovery.patch_namespaced_endpoint_slice(route, served.namespace, body)
    assert "intruder" in {ep.target_ref.name for ep in landed.endpoints if ep.target_ref}
    wait_for(lambda: served.slice_pods(AD) == before, REPAIR, 0.1, "foreign endpoint removed")


def test_deleted_routing_objects_are_recreated(served: LocalFleet) -> None:
    route = res.adapter_route_name(AD)
    before = served.slice_pods(AD)
    served.discovery.delete_namespaced_endpoint_slice(route, served.namespace)
    wait_for(lambda: served.slice_pods(AD) == before, REPAIR, 0.1, "slice recreated")
    served.core.delete_namespaced_service(route, served.namespace)
    wait_for(lambda: served.core.read_namespaced_service(route, served.namespace), REPAIR, 0.1, "adapter Service back")
    worker_svc = res.worker_name(BM)
    served.core.delete_namespaced_service(worker_svc, served.namespace)
    wait_for(lambda: served.core.read_namespaced_service(worker_svc, served.namespace), REPAIR, 0.1, "worker Service")
    pdb = res.worker_name(BM)
    served.policy.delete_namespaced_pod_disruption_budget(pdb, served.namespace)
    wait_for(lambda: served.policy.read_namespaced_pod_disruption_budget(pdb, served.namespace), REPAIR, 0.1, "PDB")
    assert served.complete(AD).status_code == 200


def test_engine_switch_leaves_no_stale_field(served: LocalFleet, tiny_assets) -> None:
    """lorafleet -> vllm on a BaseModel without pods: the vLLM Deployment carries nothing of the lorafleet one."""
    name = "switcher"
    served.create(c.BASEMODELS, basemodel(name, tiny_assets["model"], replicas=0))
    ctr = wait_for(lambda: _deployment(served, name).spec.template.spec.containers[0], REPAIR, 0.2)
    assert ctr.command == ["lorafleet", "worker"]
    served.patch(c.BASEMODELS, name, {"spec": {"engine": "vllm"}})

    def switched():
        dep = _deployment(served, name)
        ctr = dep.spec.template.spec.containers[0]
        return ctr if "--enable-lora" in (ctr.args or []) else None

    ctr = wait_for(switched, REPAIR, 0.2, "vLLM template")
    pod = _deployment(served, name).spec.template.spec
    assert not ctr.command
    assert "LORAFLEET_WORKER_ID" not in {e.name for e in ctr.env or []}
    assert "--admin-token-file" not in ctr.args
    assert "admin-token" not in {v.name for v in pod.volumes or []}
    assert "admin-token" not in {m.name for m in ctr.volume_mounts or []}
    served.delete(c.BASEMODELS, name)


def test_deleted_deployment_is_recreated_and_serves_again(served: LocalFleet) -> None:
    pid = served.operator.pid
    served.apps.delete_namespaced_deployment(res.worker_name(BM), served.namespace)
    wait_for(lambda: _gone(lambda: _deployment(served)) or _deployment(served).metadata.deletion_timestamp, 10, 0.05)
    t0 = time.monotonic()
    wait_for(lambda: not (d := _deployment(served)).metadata.deletion_timestamp and d, REPAIR, 0.1, "recreated")
    assert time.monotonic() - t0 < REPAIR
    wait_for(lambda: _served_by_live_pods(served), 180, 0.5, "adapter serves from the new workers")
    assert served.operator.pid == pid and served.operator.poll() is None


def test_local_mode_restarts_a_dead_operator_and_routing_recovers(served: LocalFleet) -> None:
    """`lorafleet up`'s supervisor loop: the operator SIGKILLed is started again, and a pod deleted meanwhile has
    its adapter routed elsewhere by the new process."""
    import os
    import signal
    import threading

    from lorafleet.local.up import keep_operator_running

    stop = threading.Event()
    refreshed: list[int] = []
    loop = threading.Thread(
        target=keep_operator_running,
        args=(served, lambda: refreshed.append(1)),
        kwargs={"poll": 0.2, "refresh_every": 3600.0, "stop": stop},
        daemon=True,
    )
    # the kill must meet one routed, serving pod of the current Deployment, not one still draining from a rollout
    wait_for(lambda: len(served.routes(AD)) == 1 and _served_by_live_pods(served), 180, 0.3, "one serving route")
    (victim,) = [p for p, _ in served.routes(AD)]
    loop.start()
    try:
        old = served.operator
        os.killpg(old.pid, signal.SIGKILL)
        served.core.delete_namespaced_pod(victim, served.namespace, grace_period_seconds=0)
        wait_for(lambda: served.operator is not old and served.operator.poll() is None, 30, 0.1, "operator restarted")
        wait_for(lambda: (r := served.routes(AD)) and r[0][0] != victim and served.serves(AD), 180, 0.5, "rerouted")
        assert refreshed == []  # the token refresh is due only after half its lifetime
    finally:
        stop.set()
        loop.join(timeout=10)
