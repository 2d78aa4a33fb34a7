"""The operator's identity towards the API server, for kopf's watches and posts."""

from __future__ import annotations

from typing import Any

import kopf
from lorafleet.operator.kube import connection_info, load_config


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """Credentials loaded afresh on every login kopf asks for (at start and after a 401), from the same source as
    the operator's own client: a rotated ServiceAccount token or a rewritten kubeconfig is picked up."""
    return connection_info(load_config(memo.runtime.kubeconfig))
