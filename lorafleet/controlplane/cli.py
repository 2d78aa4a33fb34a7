"""`lorafleet cluster`: run a local control plane in the foreground until Ctrl-C (or SIGTERM)."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from lorafleet.controlplane.cluster import ControlPlane


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorafleet cluster", description=__doc__)
    p.add_argument("--state-dir", help="keep certificates, etcd data and kubeconfig here (default: a temporary dir)")
    p.add_argument("--kwok-nodes", type=int, default=2, help="fake GPU nodes to create (0: no KWOK)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--no-controllers", action="store_true", help="only etcd + kube-apiserver")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwind through the context manager
    cp = ControlPlane(
        args.state_dir,
        controllers=not args.no_controllers,
        kwok=args.kwok_nodes > 0,
        kwok_nodes=args.kwok_nodes,
        gpus_per_node=args.gpus_per_node,
    )
    with cp:
        print(f"kubeconfig: {cp.kubeconfig}")
        print(f"export KUBECONFIG={cp.kubeconfig}")
        print(f"API server {cp.server} ready in {cp.started_seconds:.1f}s; Ctrl-C stops it", flush=True)
        try:
            while cp.running:
                time.sleep(1)
        except KeyboardInterrupt:
            print("stopping", file=sys.stderr)
    return 0
