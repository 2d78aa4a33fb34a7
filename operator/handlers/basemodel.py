"""BaseModel: owned children (admin Secret, worker Deployment, Service, PDB) and the fleet daemon.

The handlers only build manifests with `resources` and apply them; the daemon hands the whole placement / routing
job to `BaseModelFleet`, which is woken by adapter and pod events.
"""

from __future__ import annotations

from typing import Any

import kopf
from lorafleet.operator import conditions
from lorafleet.operator import constants as c
from lorafleet.operator import resources as res
from lorafleet.operator.fleet import BaseModelFleet
from lorafleet.operator.state import Runtime, index_key


async def ensure_children(body: dict[str, Any], rt: Runtime) -> list[str]:
    """Creates or updates every owned object. The Secret is created once: rotating it would lock workers out."""
    kube = rt.kube
    await kube.apply(res.admin_secret(body, res.new_admin_token()), patch=False)
    done = [res.admin_secret_name(body["metadata"]["name"])]
    for manifest in (
        res.worker_deployment(body, rt.config.adapter_root),
        res.worker_service(body),
        res.worker_pdb(body),
    ):
        await kube.apply(manifest)
        done.append(f"{manifest['kind']}/{manifest['metadata']['name']}")
    return done


@kopf.on.resume(c.GROUP, c.VERSION, c.BASEMODELS)
@kopf.on.create(c.GROUP, c.VERSION, c.BASEMODELS)
@kopf.on.update(c.GROUP, c.VERSION, c.BASEMODELS, field="spec")
async def basemodel_apply(body: kopf.Body, memo: kopf.Memo, namespace: str, name: str, **_: Any) -> None:
    rt: Runtime = memo.runtime
    done = await ensure_children(dict(body), rt)
    kopf.info(body, reason="Reconciled", message=f"applied {', '.join(done)}")
    rt.wake(namespace, name)


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
        await rt.kube.replace_endpointslice(res.adapter_endpointslice(adapter, port, []))
        gen = adapter["metadata"].get("generation")
        conds = (adapter.get("status") or {}).get("conditions") or []
        msg = f"BaseModel {name} was deleted"
        conds = conditions.set_condition(conds, "Ready", False, "BaseModelNotFound", msg, gen)
        conds = conditions.set_condition(conds, "Placed", False, "BaseModelNotFound", msg, gen)
        status = {"phase": "Pending", "placements": [], "message": msg, "conditions": conds, "observedGeneration": gen}
        await rt.kube.patch_status(c.ADAPTERS, namespace, adapter["metadata"]["name"], status)
        kopf.warn(adapter, reason="BaseModelNotFound", message=msg)
    kopf.info(body, reason="Deleting", message="workers, service, PDB and admin token are garbage-collected")
