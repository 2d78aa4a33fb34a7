"""A real local Kubernetes control plane (etcd, kube-apiserver, controllers, scheduler, KWOK GPU nodes).

Public API: `ControlPlane` (context manager), `binaries()`, and `main(argv)` behind `lorafleet cluster`.
"""

from lorafleet.controlplane.binaries import Binaries, binaries, versions
from lorafleet.controlplane.cli import main
from lorafleet.controlplane.client import ApiError
from lorafleet.controlplane.cluster import CommandError, ControlPlane, free_port

__all__ = ["ApiError", "Binaries", "CommandError", "ControlPlane", "binaries", "free_port", "main", "versions"]
