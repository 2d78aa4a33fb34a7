"""`lorafleet operator`: runs the kopf operator with peering (or standalone), a liveness endpoint and metrics.

One active operator per cluster: with `--peering NAME` a second replica sees the first through kopf's peering
objects and stays passive until it disappears. `--standalone` skips peering (tests, `lorafleet up`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import threading
from typing import Any

import kopf
from lorafleet.operator.state import OperatorConfig, Runtime


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorafleet operator", description=__doc__)
    p.add_argument("--namespace", "-n", action="append", default=[], help="watch this namespace (repeatable)")
    p.add_argument("--all-namespaces", "-A", action="store_true", help="watch the whole cluster")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--standalone", action="store_true", help="no peering: always active")
    group.add_argument("--peering", default=None, help="kopf peering object name (one active replica)")
    p.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority; the highest live replica is active (default: random, so replicas never tie: "
        "kopf pauses every replica when two share the top priority)",
    )
    p.add_argument("--kubeconfig", default=None)
    p.add_argument(
        "--local-endpoints",
        action="store_true",
        default=os.environ.get("LORAFLEET_LOCAL_ENDPOINTS", "").lower() in {"1", "true", "yes"},
        help="reach workers at the pod annotation lorafleet.io/local-endpoint (local mode) instead of podIP:port",
    )
    p.add_argument("--metrics-port", type=int, default=8080, help="0 disables the metrics endpoint")
    p.add_argument("--liveness-port", type=int, default=8081, help="0 disables /healthz")
    p.add_argument(
        "--liveness-host",
        default=os.environ.get("LORAFLEET_LIVENESS_HOST", "0.0.0.0"),
        help="address /healthz listens on (default $LORAFLEET_LIVENESS_HOST or 0.0.0.0: kubelet probes the pod IP, "
        "so a loopback-only listener fails every probe in a real cluster)",
    )
    p.add_argument("--interval", type=float, default=1.0, help="reconcile period when nothing happens (s)")
    p.add_argument("--drain-grace", type=float, default=1.0, help="seconds routers get to see a routing change")
    p.add_argument("--drain-timeout", type=float, default=60.0)
    p.add_argument("--rebalance-interval", type=float, default=30.0, help="0 disables the OR-Tools rebalancer")
    p.add_argument(
        "--per-replica-rate", type=float, default=4.0, help="requests/s one replica carries for replicas.auto"
    )
    p.add_argument(
        "--scale-down-delay",
        type=float,
        default=30.0,
        help="seconds the rate of a replicas.auto adapter must stay below 80%% of the per-replica rate of one replica "
        "fewer before that replica is removed (scale-up is immediate)",
    )
    p.add_argument(
        "--resync-interval",
        type=float,
        default=30.0,
        help="seconds between full re-applies of every owned child; watches repair drift within a cycle",
    )
    p.add_argument("--adapter-root", default="/var/lib/lorafleet/adapters", help="host path mounted into workers")
    p.add_argument("--verbose", "-v", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    return OperatorConfig(
        local_endpoints=args.local_endpoints,
        interval=args.interval,
        drain_grace=args.drain_grace,
        drain_timeout=args.drain_timeout,
        rebalance_interval=args.rebalance_interval,
        adapter_root=args.adapter_root,
        per_replica_rate=args.per_replica_rate,
        scale_down_delay=args.scale_down_delay,
        resync_interval=args.resync_interval,
    )


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = "lorafleet.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="lorafleet.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="lorafleet.io", key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.networking.request_timeout = 30
    settings.execution.max_workers = 8


def make_runtime(config: OperatorConfig, kubeconfig: str | None = None) -> Runtime:
    from lorafleet.operator.events import EventRecorder
    from lorafleet.operator.kube import Kube, load_config
    from lorafleet.operator.metrics import OperatorMetrics

    kube = Kube(load_config(kubeconfig))
    return Runtime(
        config=config, kube=kube, metrics=OperatorMetrics(), events=EventRecorder(kube), kubeconfig=kubeconfig
    )


async def run_operator(
    args: argparse.Namespace,
    runtime: Runtime,
    *,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: threading.Event | None = None,
) -> None:
    import lorafleet.operator.handlers  # noqa: F401  (registers handlers)

    liveness = f"http://{args.liveness_host}:{args.liveness_port}/healthz" if args.liveness_port else None
    await kopf.operator(
        standalone=bool(args.standalone or not args.peering),
        peering_name=args.peering,
        priority=args.priority if args.priority is not None else random.randint(1, 1_000_000),
        clusterwide=bool(args.all_namespaces),
        namespaces=args.namespace if not args.all_namespaces else (),
        liveness_endpoint=liveness,
        memo=kopf.Memo(runtime=runtime),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.namespace and not args.all_namespaces:
        args.namespace = [os.environ.get("LORAFLEET_NAMESPACE", "default")]
    kopf.configure(verbose=args.verbose)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    runtime = make_runtime(config_from_args(args), args.kubeconfig)
    if args.metrics_port:
        runtime.metrics.serve(args.metrics_port)
    asyncio.run(run_operator(args, runtime))
    return 0
