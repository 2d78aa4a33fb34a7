"""Operator benchmark on a local cluster (real API server, KWOK nodes, real CPU worker processes, tiny model).

Writes bench/results/operator_local.json with, under `metrics`:
- adapter_ready_seconds: LoRAAdapter created → first successful completion routed through its EndpointSlice (median
  over N adapters; the max is reported beside it)
- failover_replace_seconds: a worker pod deleted → every adapter it held routed to another worker and answering
- crash_replace_seconds: a worker process SIGKILLed (pod stays) → its adapters answering on other workers
- migration_dropped_requests: requests that failed while a worker was drained (all its adapters handed off) under a
  steady request stream per adapter (target 0)

Usage: python bench/operator_local.py [--adapters 6] [--workers 3] [--out bench/results/operator_local.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--adapters", type=int, default=6)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/operator_local.json")
    args = p.parse_args()

    import torch
    from common import provenance, write_result
    from lorafleet.operator import constants as c
    from lorafleet.worker.testing import build_peft_adapter, build_tiny_llama

    from lorafleet.controlplane.cluster import ControlPlane
    from lorafleet.local.harness import LocalFleet, StreamingRouter, service_account_kubeconfig, wait_for
    from lorafleet.local.samples import adapter, basemodel

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-op-"))
    model = build_tiny_llama(work / "model")
    paths = [build_peft_adapter(work / "adapters" / f"a{i}", model, rank=8, seed=i + 1) for i in range(args.adapters)]
    metrics: dict[str, float] = {}
    notes: dict[str, object] = {}
    with ControlPlane(controllers=True, kwok=True, kwok_nodes=args.workers, quiet=True) as cp:
        cp.kubectl("apply", "--server-side", "-k", str(ROOT / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "crd/loraadapters.lorafleet.io", "--timeout=60s")
        sa = service_account_kubeconfig(cp.kubeconfig, work / "operator.kubeconfig", ROOT / "manifests")
        fleet = LocalFleet(
            cp.kubeconfig, "bench", work / "fleet", adapter_root=str(work / "adapters"), operator_kubeconfig=sa,
            operator_args=["--interval", "1.0", "--drain-grace", "0.5", "--rebalance-interval", "0"],
            worker_extra_args=["--max-num-seqs", "8", "--kv-cache-bytes", str(16 << 20)],
        )  # fmt: skip
        try:
            fleet.ensure_namespace()
            fleet.start_shim()
            fleet.start_operator()
            t0 = time.monotonic()
            fleet.create(c.BASEMODELS, basemodel("tiny", model, replicas=args.workers, maxAdapters=8))
            wait_for(
                lambda: (fleet.get(c.BASEMODELS, "tiny").get("status") or {}).get("readyWorkers") == args.workers,
                300, 0.5, "workers ready",
            )  # fmt: skip
            notes["workers_ready_seconds"] = round(time.monotonic() - t0, 2)

            # 1) adapter applied -> first completion through its routing
            ready = []
            for i, path in enumerate(paths):
                name = f"a{i}"
                t = time.monotonic()
                fleet.create(c.ADAPTERS, adapter(name, "tiny", path, replicas=1))
                wait_for(lambda name=name: fleet.routes(name) and fleet.complete(name).status_code == 200, 60, 0.02)
                ready.append(time.monotonic() - t)
            metrics["adapter_ready_seconds"] = round(statistics.median(ready), 3)
            metrics["adapter_ready_seconds_max"] = round(max(ready), 3)
            names = [f"a{i}" for i in range(len(paths))]

            # 2) migration under load: drain the busiest worker while every adapter on it takes a request stream
            holder = {n: fleet.routes(n)[0][0] for n in names}
            source = max(set(holder.values()), key=lambda w: sum(1 for v in holder.values() if v == w))
            moving = [n for n, w in holder.items() if w == source]
            routers = [StreamingRouter(fleet, n, concurrency=1) for n in moving]
            for r in routers:
                r.__enter__()
            try:
                wait_for(lambda: all(r.ok >= 3 for r in routers), 60, 0.1, "streams warm")
                t = time.monotonic()
                fleet.core.patch_namespaced_pod(
                    source, "bench", {"metadata": {"annotations": {"lorafleet.io/drain": "true"}}}
                )
                wait_for(lambda: all(fleet.routes(n) and fleet.routes(n)[0][0] != source for n in moving), 60, 0.05)
                notes["migration_reroute_seconds"] = round(time.monotonic() - t, 3)
                token = fleet.admin_token("tiny")
                src_ep = fleet.pod_endpoints()[source]
                wait_for(lambda: not set(moving) & set(fleet.worker_adapters(src_ep, token)), 60, 0.1, "unloaded")
                notes["migration_complete_seconds"] = round(time.monotonic() - t, 3)
                before = [r.ok for r in routers]
                wait_for(lambda: all(r.ok >= b + 3 for r, b in zip(routers, before, strict=True)), 60, 0.1)
            finally:
                for r in routers:
                    r.__exit__(None, None, None)
            metrics["migration_dropped_requests"] = sum(len(r.failed) for r in routers)
            notes["migration_requests_ok"] = sum(r.ok for r in routers)
            notes["migrated_adapters"] = len(moving)
            notes["migration_failures_sample"] = [f for r in routers for f in r.failed][:5]
            fleet.core.patch_namespaced_pod(
                source, "bench", {"metadata": {"annotations": {"lorafleet.io/drain": None}}}
            )

            # 3) failover: delete the worker holding the most adapters
            holder = {n: fleet.routes(n)[0][0] for n in names}
            victim = max(set(holder.values()), key=lambda w: sum(1 for v in holder.values() if v == w))
            lost = [n for n, w in holder.items() if w == victim]
            t = time.monotonic()
            fleet.core.delete_namespaced_pod(victim, "bench", grace_period_seconds=0)
            for n in lost:
                wait_for(
                    lambda n=n: (r := fleet.routes(n)) and r[0][0] != victim and fleet.complete(n, r[0][1]).status_code == 200,
                    60, 0.02,
                )  # fmt: skip
            metrics["failover_replace_seconds"] = round(time.monotonic() - t, 3)
            notes["failover_adapters"] = len(lost)

            # 4) crash: SIGKILL the worker process behind the pod holding the most adapters (the pod stays)
            wait_for(lambda: (fleet.get(c.BASEMODELS, "tiny").get("status") or {}).get("readyWorkers") == args.workers,
                     300, 0.5, "replacement worker ready")  # fmt: skip
            holder = {n: fleet.routes(n)[0][0] for n in names}
            crashed = max(set(holder.values()), key=lambda w: sum(1 for v in holder.values() if v == w))
            lost = [n for n, w in holder.items() if w == crashed]
            t = time.monotonic()
            fleet.shim.kill_worker(crashed)
            for n in lost:
                wait_for(
                    lambda n=n: (r := fleet.routes(n)) and r[0][0] != crashed and fleet.complete(n, r[0][1]).status_code == 200,
                    60, 0.02,
                )  # fmt: skip
            metrics["crash_replace_seconds"] = round(time.monotonic() - t, 3)
            notes["crash_adapters"] = len(lost)
            notes["operator_reconcile_errors"] = fleet.operator_metric("lorafleet_operator_reconcile_errors_total")
        finally:
            fleet.close()
    result = {
        "benchmark": "operator_local",
        **provenance("operator_local.py", None, "cpu"),
        "setup": "2 shared CPU cores; real kube-apiserver, controllers and KWOK nodes; real lorafleet worker processes "
        "(tiny Llama); the operator as the manifests' ServiceAccount",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "params": {"adapters": args.adapters, "workers": args.workers},
        "metrics": metrics,
        "notes": notes,
        "targets": {
            "adapter_ready_seconds": "<= 2.0",
            "failover_replace_seconds": "<= 10",
            "migration_dropped_requests": "= 0",
        },
    }
    write_result(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
