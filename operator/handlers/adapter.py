"""LoRAAdapter: report what the fleet cannot (a missing BaseModel) and run the delete → drain → unload path.

Placement, loading, routing and status of adapters whose BaseModel exists are the fleet's job (level-triggered);
these handlers stay thin so that a restart or a missed event never leaves an adapter half-handled.
"""

from __future__ import annotations

from typing import Any

import kopf
from lorafleet.operator import conditions
from lorafleet.operator import constants as c
from lorafleet.operator import resources as res
from lorafleet.operator.state import Runtime, index_key
from lorafleet.operator.validation import validate_adapter


@kopf.on.resume(c.GROUP, c.VERSION, c.ADAPTERS)
@kopf.on.create(c.GROUP, c.VERSION, c.ADAPTERS)
@kopf.on.update(c.GROUP, c.VERSION, c.ADAPTERS, field="spec")
async def adapter_apply(
    body: kopf.Body, spec: kopf.Spec, namespace: str, name: str, memo: kopf.Memo, basemodels_idx: kopf.Index, **_: Any
) -> None:
    rt: Runtime = memo.runtime
    bm_name = spec.get("baseModel")
    bm = next(iter(basemodels_idx.get(index_key(namespace, bm_name), [])), None)
    if bm is not None:
        rt.wake(namespace, bm_name)
        return
    problem = validate_adapter(body, None)[0]
    gen = body["metadata"].get("generation")
    conds = (body.get("status") or {}).get("conditions") or []
    conds = conditions.set_condition(conds, "Ready", False, problem.reason, problem.message, gen)
    conds = conditions.set_condition(conds, "Placed", False, problem.reason, problem.message, gen)
    status = {
        "observedGeneration": gen,
        "phase": "Pending",
        "placements": [],
        "message": problem.message,
        "conditions": conds,
    }
    await rt.kube.patch_status(c.ADAPTERS, namespace, name, status)
    rt.event(body, "Warning", problem.reason, problem.message)


@kopf.on.delete(c.GROUP, c.VERSION, c.ADAPTERS)
async def adapter_delete(
    body: kopf.Body, spec: kopf.Spec, namespace: str, name: str, memo: kopf.Memo, **_: Any
) -> None:
    """Drain and unload from every worker (the fleet un-routes first), then remove the routing objects."""
    rt: Runtime = memo.runtime
    fleet = rt.fleet(namespace, str(spec.get("baseModel")))
    if fleet is not None:
        if not await fleet.wait_gone(name, timeout=rt.config.drain_timeout + 10):
            raise kopf.TemporaryError("adapter still loaded or draining on some worker", delay=2)
        await fleet.forget(name, body)
    else:
        route = res.adapter_route_name(name)
        await rt.kube.delete("EndpointSlice", namespace, route)
        await rt.kube.delete("Service", namespace, route)
    rt.event(body, "Normal", "Removed", "drained, unloaded from every worker and unrouted")
