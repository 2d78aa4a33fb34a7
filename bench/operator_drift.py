"""Drift repair, drained scale-down and Event aggregation on a local cluster (real API server, KWOK nodes, real CPU
worker processes, tiny model, the operator as its least-privilege ServiceAccount).

Writes bench/results/operator_drift.json with, under `metrics`:
- drift_repair_seconds: the slowest of the drift cases (worker Deployment deleted, hand-scaled, label removed; worker
  Service, adapter Service and EndpointSlice deleted; a foreign endpoint added), each timed from the change to the
  object being as the operator wants it again (target <= 10; the periodic resync alone would take 30)
- scaledown_failed_requests: requests that failed while the BaseModel went 3 -> 1 workers under one steady request
  stream per adapter (target 0)
- events_per_failure: Event objects per refused child after several resyncs (target 1; their `count` says how often)
Per-case times are under `notes.drift_cases`.

Usage: python -P bench/operator_drift.py [--out bench/results/operator_drift.json]  (a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]


def timed(change: Callable[[], Any], repaired: Callable[[], Any], timeout: float = 60.0) -> float:
    from lorafleet.local.harness import wait_for

    change()
    t0 = time.monotonic()
    wait_for(repaired, timeout, 0.02, "repair")
    return round(time.monotonic() - t0, 3)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/operator_drift.json")
    args = p.parse_args()

    import torch
    from common import provenance, write_result
    from kubernetes.client.rest import ApiException
    from lorafleet.operator import constants as c
    from lorafleet.operator import resources as res
    from lorafleet.worker.testing import build_peft_adapter, build_tiny_llama

    from lorafleet.controlplane.cluster import ControlPlane
    from lorafleet.local.harness import LocalFleet, StreamingRouter, service_account_kubeconfig, wait_for
    from lorafleet.local.samples import adapter, basemodel

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-drift-"))
    model = build_tiny_llama(work / "model")
    names = ["d0", "d1", "d2"]
    paths = [build_peft_adapter(work / "adapters" / n, model, rank=8, seed=i + 1) for i, n in enumerate(names)]
    metrics: dict[str, float] = {}
    notes: dict[str, Any] = {}
    with ControlPlane(controllers=True, kwok=True, kwok_nodes=3, quiet=True) as cp:
        cp.kubectl("apply", "--server-side", "-k", str(ROOT / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "crd/loraadapters.lorafleet.io", "--timeout=60s")
        sa = service_account_kubeconfig(cp.kubeconfig, work / "operator.kubeconfig", ROOT / "manifests")
        cp.kubectl("apply", "--server-side", "-k", str(ROOT / "manifests/admission"))  # as installed: writes only ours
        fleet = LocalFleet(
            cp.kubeconfig, "bench", work / "fleet", adapter_root=str(work / "adapters"), operator_kubeconfig=sa,
            operator_args=["--interval", "1.0", "--drain-grace", "0.5", "--rebalance-interval", "0"],
            worker_extra_args=["--max-num-seqs", "8", "--kv-cache-bytes", str(16 << 20)],
        )  # fmt: skip
        ns, bm = fleet.namespace, "tiny"
        dep_name = res.worker_name(bm)
        try:
            fleet.ensure_namespace()
            fleet.start_shim()
            fleet.start_operator()
            fleet.create(c.BASEMODELS, basemodel(bm, model, replicas=3))
            for n, path in zip(names, paths, strict=True):
                fleet.create(c.ADAPTERS, adapter(n, bm, path, replicas=1))
            for n in names:
                wait_for(lambda n=n: fleet.serves(n), 300, 0.3, f"{n} serving")

            def dep() -> Any:
                return fleet.apps.read_namespaced_deployment(dep_name, ns)

            def exists(fn: Callable[[], Any]) -> bool:
                try:
                    obj = fn()
                except ApiException:
                    return False
                return obj.metadata.deletion_timestamp is None

            route = res.adapter_route_name(names[0])
            slice_before = fleet.slice_pods(names[0])
            cases: dict[str, float] = {}
            cases["scaled_by_hand"] = timed(
                lambda: fleet.apps.patch_namespaced_deployment_scale(dep_name, ns, {"spec": {"replicas": 5}}),
                lambda: dep().spec.replicas == 3,
            )
            cases["label_removed"] = timed(
                lambda: fleet.apps.patch_namespaced_deployment(
                    dep_name, ns, {"metadata": {"labels": {c.LABEL_MANAGED_BY: None}}}
                ),
                lambda: (dep().metadata.labels or {}).get(c.LABEL_MANAGED_BY) == c.MANAGER,
            )
            sl = fleet.discovery.read_namespaced_endpoint_slice(route, ns)
            foreign = {
                "addresses": ["10.99.0.9"],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "name": "x"},
            }
            cases["foreign_endpoint"] = timed(
                lambda: fleet.discovery.patch_namespaced_endpoint_slice(
                    route,
                    ns,
                    {"endpoints": [*fleet.discovery.api_client.sanitize_for_serialization(sl.endpoints), foreign]},
                ),
                lambda: fleet.slice_pods(names[0]) == slice_before,
            )
            cases["endpointslice_deleted"] = timed(
                lambda: fleet.discovery.delete_namespaced_endpoint_slice(route, ns),
                lambda: fleet.slice_pods(names[0]) == slice_before,
            )
            cases["adapter_service_deleted"] = timed(
                lambda: fleet.core.delete_namespaced_service(route, ns),
                lambda: exists(lambda: fleet.core.read_namespaced_service(route, ns)),
            )
            cases["worker_service_deleted"] = timed(
                lambda: fleet.core.delete_namespaced_service(dep_name, ns),
                lambda: exists(lambda: fleet.core.read_namespaced_service(dep_name, ns)),
            )
            cases["deployment_deleted"] = timed(
                lambda: fleet.apps.delete_namespaced_deployment(dep_name, ns, propagation_policy="Orphan"),
                lambda: exists(dep) and dep().metadata.uid is not None,
            )
            metrics["drift_repair_seconds"] = max(cases.values())
            notes["drift_cases"] = cases
            notes["deployment_deleted"] = "orphan propagation (pods kept); the drift test deletes it in the foreground"
            wait_for(lambda: all(fleet.serves(n) for n in names), 120, 0.5, "serving after drift")
            wait_for(lambda: (fleet.get(c.BASEMODELS, bm).get("status") or {}).get("readyWorkers") == 3, 300, 0.5)

            # scale-down 3 -> 1 under one stream per adapter
            streams = [StreamingRouter(fleet, n, concurrency=1) for n in names]
            for s in streams:
                s.__enter__()
            t0 = time.monotonic()
            try:
                wait_for(lambda: all(s.ok >= 3 for s in streams), 60, 0.1, "streams")
                fleet.patch(c.BASEMODELS, bm, {"spec": {"replicas": 1}})
                wait_for(lambda: len(fleet.worker_pods(bm)) == 1, 180, 0.2, "one worker")
                notes["scaledown_seconds"] = round(time.monotonic() - t0, 3)
                before = [s.ok for s in streams]
                wait_for(lambda: all(s.ok >= b + 3 for s, b in zip(streams, before, strict=True)), 60, 0.1)
            finally:
                for s in streams:
                    s.__exit__(None, None, None)
            metrics["scaledown_failed_requests"] = sum(len(s.failed) for s in streams)
            notes["scaledown_ok_requests"] = sum(s.ok for s in streams)
            notes["scaledown_failures"] = [f for s in streams for f in s.failed][:5]

            # Event aggregation: refused children, several resyncs later
            bad = {
                "memory-lots": {"limits": {"memory": "lots"}},
                "typo-key": {"limts": {"cpu": "1"}},
                "req-over-limit": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}},
            }
            for name, resources in bad.items():
                body = basemodel(name, model, replicas=0)
                body["spec"]["worker"]["resources"] = resources
                fleet.create(c.BASEMODELS, body)
            for name in bad:
                wait_for(lambda name=name: (fleet.condition(c.BASEMODELS, name, "Degraded") or {}).get("reason")
                         == "ChildRejected", 60, 0.2, name)  # fmt: skip
            time.sleep(12)  # failures are retried every 5 s
            counts = {}
            for name in bad:
                evs = [e for e in fleet.events_for(name) if e.reason == "ChildRejected"]
                counts[name] = [e.count for e in evs]
            metrics["events_per_failure"] = max(len(v) for v in counts.values())
            notes["event_counts"] = counts
        finally:
            fleet.close()
    result = {
        "benchmark": "operator_drift",
        **provenance("operator_drift.py", None, "cpu"),
        "setup": "2 shared CPU cores; real kube-apiserver, controllers and KWOK nodes; real lorafleet worker processes "
        "(tiny Llama); the operator as the manifests' ServiceAccount under manifests/admission/",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metrics": metrics,
        "notes": notes,
        "baseline": "the periodic resync alone repairs within --resync-interval (30 s); watches make it one cycle",
        "targets": {"drift_repair_seconds": "<= 10", "scaledown_failed_requests": "= 0", "events_per_failure": "= 1"},
    }
    write_result(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
