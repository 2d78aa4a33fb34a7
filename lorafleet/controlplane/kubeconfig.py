"""Writes self-contained kubeconfig files (certificates embedded) so they keep working when copied elsewhere."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from lorafleet.controlplane.pki import KeyPair


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(
    path: Path, server: str, ca_cert: Path, client: KeyPair, user: str, cluster: str = "lorafleet"
) -> Path:
    """JSON is valid YAML, and kubectl, helm, client-go and the Python client all read it."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {"server": server, "certificate-authority-data": _b64(ca_cert)}}],
        "users": [
            {"name": user, "user": {"client-certificate-data": _b64(client.cert), "client-key-data": _b64(client.key)}}
        ],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": user, "namespace": "default"}}],
        "current-context": cluster,
        "preferences": {},
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)
    return path
