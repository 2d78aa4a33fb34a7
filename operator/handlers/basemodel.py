"""BaseModel: the fleet daemon (which owns the children: admin Secret, worker Deployment, Service, PDB) and delete.

Children are not applied here: a handler runs on create/update only, while the fleet loop applies them whenever one
drifts (watch events in `owned.py`), the spec changes, the scale plan changes the replica count, and on resync.
"""

from __future__ import annotations

from typing import Any

import kopf
from lorafleet.operator import conditions
from lorafleet.operator import constants as c
from lorafleet.operator import resources as res
from lorafleet.operator.fleet import BaseModelFleet
from lorafleet.operator.state import Runtime, index_key


@kopf.on.event(c.GROUP, c.VERSION, c.BASEMODELS)
def basemodel_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """A spec edit (or scale) reaches the fleet loop at once; it re-applies the children on a new generation."""
    memo.runtime.wake(namespace, name)


@kopf.daemon(c.GROUP, c.VERSION, c.BASEMODELS, cancellation_timeout=5.0)
async def basemodel_fleet(
    namespace: str,
    name: str,
    memo: kopf.Memo,
    stopped: kopf.DaemonStopped,
    basemodels_idx: kopf.Index,
    adapters_idx: kopf.Index,
    workerpods_idx: kopf.Index,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    rt: Runtime = memo.runtime
    key = index_key(namespace, name)
    fleet = BaseModelFleet(rt, namespace, name)
    previous = rt.fleets.get(key)
    logger.info("fleet daemon starting (replaces a running fleet: %s)", previous is not None)
    rt.fleets[key] = fleet

    def view() -> tuple[dict[str, Any] | None, list[dict[str, Any]], list[dict[str, Any]]]:
        bm = next(iter(basemodels_idx.get(key, [])), None)
        if bm is not None and bm["metadata"].get("deletionTimestamp"):
            bm = None
        return bm, list(adapters_idx.get(key, [])), list(workerpods_idx.get(key, []))

    try:
        await fleet.run(view, stopped)
    finally:
        if rt.fleets.get(key) is fleet:
            del rt.fleets[key]
        await fleet.close()


@kopf.on.delete(c.GROUP, c.VERSION, c.BASEMODELS)
async def basemodel_delete(
    body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, adapters_idx: kopf.Index, **_: Any
) -> None:
    """Children go with their owner (garbage collector). Its adapters are un-routed at once (their workers are
    going away) and say why they no longer serve; they come back by themselves if the BaseModel is recreated."""
    rt: Runtime = memo.runtime
    port = res.worker_port(body)
    for adapter in list(adapters_idx.get(index_key(namespace, name), [])):
        if adapter["metadata"].get("deletionTimestamp"):
            continue
        await rt.kube.apply(res.adapter_endpointslice(adapter, port, []))
        gen = adapter["metadata"].get("generation")
        conds = (adapter.get("status") or {}).get("conditions") or []
        msg = f"BaseModel {name} was deleted"
        conds = conditions.set_condition(conds, "Ready", False, "BaseModelNotFound", msg, gen)
        conds = conditions.set_condition(conds, "Placed", False, "BaseModelNotFound", msg, gen)
        status = {"phase": "Pending", "placements": [], "message": msg, "conditions": conds, "observedGeneration": gen}
        await rt.kube.patch_status(c.ADAPTERS, namespace, adapter["metadata"]["name"], status)
        rt.event(adapter, "Warning", "BaseModelNotFound", msg)
    rt.event(body, "Normal", "Deleting", "workers, service, PDB and admin token are garbage-collected")
