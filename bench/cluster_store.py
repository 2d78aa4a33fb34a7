"""Adapters and continual-learning versions from a real S3 server, through the operator in local mode.

A real API server with KWOK nodes, the operator, the kubelet shim running real `lorafleet worker` processes (tiny
Llama, CPU) and versitygw (a real S3 server process). Writes bench/results/cluster_store.json with, under `metrics`:
- adapter_ready_seconds_s3: a LoRAAdapter whose source is `s3://` applied -> its first completion routed through its
  EndpointSlice (median over N adapters; the max beside it). The worker downloads, verifies and loads it.
- adapter_ready_seconds_file: the same for the same adapters from a local path, measured in the same run (the
  baseline), and adapter_ready_ratio_s3_vs_file.
- version_rollout_seconds_s3: a ContinualLearningJob's version complete in the store (its store URI appears in the
  trainer's job status) -> the other replica, which never trained, serves it from S3 (its /v1/adapters path is that
  URI and a completion answers).

Usage: python bench/cluster_store.py [--adapters 4] [--out bench/results/cluster_store.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, provenance, write_result

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cpu (2 shared cores; KWOK nodes, 2 real lorafleet worker processes, tiny Llama, versitygw S3 server)"


def ready_seconds(fleet, name: str, base: str, uri: str) -> float:
    """LoRAAdapter applied -> first successful completion through its route."""
    from lorafleet.operator import constants as c

    from lorafleet.local.harness import wait_for
    from lorafleet.local.samples import adapter

    t = time.monotonic()
    fleet.create(c.ADAPTERS, adapter(name, base, uri, replicas=1))
    wait_for(lambda: fleet.routes(name) and fleet.complete(name).status_code == 200, 120, 0.02, f"{name} serving")
    return time.monotonic() - t


def rollout_seconds(fleet, base: str, notes: dict) -> float:
    """A CL version whole in S3 -> served by the replica that did not train it."""
    from lorafleet.operator import constants as c

    from lorafleet.local.harness import wait_for

    fleet.patch(c.ADAPTERS, "cl", {"spec": {"replicas": {"min": 2}}})
    wait_for(lambda: len(fleet.routes("cl")) == 2, 120, 0.1, "cl on 2 workers")
    job = {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "ContinualLearningJob",
        "metadata": {"name": "cl-bench"},
        "spec": {
            "adapter": "cl",
            "mode": "colocated",
            "optimizer": {"learningRate": 0.01, "gradAccumulation": 1, "maxSteps": 3},
            "publish": {"everySteps": 1000},
            "replayRatio": 0.0,
        },
    }
    fleet.create(c.CLJOBS, job)
    trainer = wait_for(
        lambda: ((fleet.get(c.CLJOBS, "cl-bench") or {}).get("metadata", {}).get("annotations") or {}).get(
            "lorafleet.io/trainer"
        ),
        60, 0.2, "job started",
    )  # fmt: skip
    eps, token = fleet.pod_endpoints(), fleet.admin_token(base)
    auth = {"Authorization": f"Bearer {token}"}
    for i in range(8):
        body = {"adapter": "cl", "kind": "pair", "prompt": f"question {i} about the fleet", "completion": " paris"}
        assert fleet.http.post(f"http://{eps[trainer]}/v1/feedback", json=body, headers=auth).status_code == 202

    def in_store() -> str | None:
        st = fleet.http.get(f"http://{eps[trainer]}/v1/training/jobs/cl-bench", headers=auth).json()
        done = [v for v in st.get("publishedVersions") or [] if v.get("path", "").startswith("s3://")]
        return done[-1]["path"] if done else None

    uri = wait_for(in_store, 180, 0.02, "a version in the store")
    t = time.monotonic()
    other = next(p for p, _ in fleet.routes("cl") if p != trainer)
    served = lambda: fleet.worker_adapters(eps[other], token).get("cl", {}).get("path") == uri  # noqa: E731
    wait_for(lambda: served() and fleet.complete("cl", eps[other]).status_code == 200, 120, 0.02, "rolled out")
    seconds = time.monotonic() - t
    notes["rolled_out_version"] = uri
    notes["trainer_path_reported"] = fleet.worker_adapters(eps[trainer], token)["cl"]["path"]
    return seconds


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--out", type=Path, default=RESULTS / "cluster_store.json")
    args = p.parse_args()

    import torch
    from lorafleet.operator import constants as c
    from lorafleet.worker.lora.sources.s3server import S3Server
    from lorafleet.worker.testing import build_peft_adapter, build_tiny_llama

    from lorafleet.controlplane.cluster import ControlPlane
    from lorafleet.local.harness import LocalFleet, service_account_kubeconfig, wait_for
    from lorafleet.local.samples import basemodel

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-store-"))
    model = build_tiny_llama(work / "model")
    local = work / "adapters"
    paths = [build_peft_adapter(local / f"a{i}", model, rank=8, seed=i + 1) for i in range(args.adapters + 1)]
    metrics: dict[str, float] = {}
    notes: dict[str, object] = {}
    with S3Server(work / "s3") as s3, ControlPlane(controllers=True, kwok=True, kwok_nodes=2, quiet=True) as cp:
        client = s3.client()
        client.create_bucket(Bucket="adapters")
        for i, path in enumerate(paths):
            for f in path.iterdir():
                client.put_object(Bucket="adapters", Key=f"tenants/a{i}/{f.name}", Body=f.read_bytes())
        cp.kubectl("apply", "--server-side", "-k", str(ROOT / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "crd/loraadapters.lorafleet.io", "--timeout=60s")
        sa = service_account_kubeconfig(cp.kubeconfig, work / "operator.kubeconfig", ROOT / "manifests")
        fleet = LocalFleet(
            cp.kubeconfig, "bench", work / "fleet", adapter_root=str(local), operator_kubeconfig=sa,
            operator_args=["--interval", "0.5", "--drain-grace", "0.5", "--rebalance-interval", "0"],
            worker_extra_args=["--max-num-seqs", "8", "--kv-cache-bytes", str(16 << 20)],
        )  # fmt: skip
        try:
            fleet.ensure_namespace()
            fleet.start_shim(env=s3.env())
            fleet.start_operator()
            t0 = time.monotonic()
            fleet.create(c.BASEMODELS, basemodel("tiny", model, replicas=2, maxAdapters=8))
            wait_for(
                lambda: (fleet.get(c.BASEMODELS, "tiny").get("status") or {}).get("readyWorkers") == 2,
                300, 0.5, "workers ready",
            )  # fmt: skip
            notes["workers_ready_seconds"] = round(time.monotonic() - t0, 2)
            # alternate the two sources so neither gets a warmer worker on average
            s3_times, file_times = [], []
            for i in range(args.adapters):
                s3_times.append(ready_seconds(fleet, f"s{i}", "tiny", f"s3://adapters/tenants/a{i}"))
                file_times.append(ready_seconds(fleet, f"f{i}", "tiny", str(paths[i])))
            metrics["adapter_ready_seconds_s3"] = round(statistics.median(s3_times), 3)
            metrics["adapter_ready_seconds_s3_max"] = round(max(s3_times), 3)
            metrics["adapter_ready_seconds_file"] = round(statistics.median(file_times), 3)
            metrics["adapter_ready_ratio_s3_vs_file"] = round(
                metrics["adapter_ready_seconds_s3"] / metrics["adapter_ready_seconds_file"], 3
            )
            notes["adapter_ready_seconds_s3_all"] = [round(x, 3) for x in s3_times]
            notes["adapter_ready_seconds_file_all"] = [round(x, 3) for x in file_times]
            ready_seconds(fleet, "cl", "tiny", f"s3://adapters/tenants/a{args.adapters}")
            metrics["version_rollout_seconds_s3"] = round(rollout_seconds(fleet, "tiny", notes), 3)
            notes["operator_reconcile_errors"] = fleet.operator_metric("lorafleet_operator_reconcile_errors_total")
        finally:
            fleet.close()
    shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "cluster_store",
        **provenance("cluster_store.py", sys.argv[1:], "cpu"),
        "device_detail": DEVICE,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "params": {"adapters": args.adapters, "workers": 2, "rank": 8},
        "metrics": metrics,
        "notes": notes,
    }
    write_result(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
