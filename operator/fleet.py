"""One BaseModel's fleet: observe → decide → act, level-triggered.

Every cycle starts from what is true *now*: the pods the API server lists and what each reachable worker says it
holds (`observe.py`). Pure functions decide replicas, placement and routing (`decide.py`, `assign.py`,
`scaledown.py`, `autoscale.py`); this module carries the decisions out: children applied (`children.py`), every
load, route change and drain as one handoff (`migration.py`), status written (`status.py`). Nothing is remembered
that could go stale across an operator restart except in-flight drains, so a restarted operator converges to the
same routing without loading anything twice. The cycle runs on a short clock and is woken at once by adapter, pod
and owned-object events, which is what makes failover and drift repair a matter of seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from lorafleet.operator import children, decide, scaledown
from lorafleet.operator import constants as c
from lorafleet.operator import resources as res
from lorafleet.operator.autoscale import AutoScaler
from lorafleet.operator.decide import AdapterView
from lorafleet.operator.migration import Load, Migrator, Release
from lorafleet.operator.observe import Observer, Worker, pod_is_running
from lorafleet.operator.state import Runtime, sleep_or_wake
from lorafleet.operator.status import StatusWriter
from lorafleet.operator.workerclient import WorkerError

__all__ = ["BaseModelFleet", "Worker", "pod_is_running"]

log = logging.getLogger(__name__)

REPEATED_EVENTS = {"Loaded", "Unloaded", "Routed", "Reloaded"}  # posted on every occurrence (still aggregated)


class BaseModelFleet:
    def __init__(self, runtime: Runtime, namespace: str, name: str) -> None:
        self.rt = runtime
        self.ns = namespace
        self.name = name
        cfg = runtime.config
        self._wake = asyncio.Event()
        self.autoscaler = AutoScaler(cfg.per_replica_rate, cfg.scale_down_delay)
        self.observer = Observer(runtime, name)
        self.migrator = Migrator(
            name, runtime.metrics, self.event, self.wake, grace=cfg.drain_grace, timeout=cfg.drain_timeout
        )
        self.children = children.Keeper(cfg.resync_interval)
        self.status = StatusWriter(self)
        self.routes: dict[str, list[str]] = {}  # adapter -> pods last written to its EndpointSlice
        self._services: set[str] = set()
        self._route_rv: dict[str, str] = {}  # adapter -> resourceVersion of the slice we last wrote
        self._last_events: dict[tuple[str, str], str] = {}
        self._gone: dict[str, asyncio.Event] = {}
        self._reload_tried: dict[tuple[str, str], tuple[str, float]] = {}  # (adapter, pod) -> (path, when)
        self._reload_failed: dict[str, str] = {}  # adapter -> the path a worker refused (its LoadFailed condition)
        self._ranks: dict[tuple[str, str], int] = {}  # (adapter, source path) -> rank a worker reported
        self._retiring: set[str] = set()
        self.workers: list[Worker] = []
        self.cycles = 0
        self.moves_pending: list[decide.Move] = []  # rebalancer moves (adapter, source, target)
        self.scale = scaledown.ScalePlan(0, ())
        self.last_solve: str | None = None  # short text of the last OR-Tools rebalance, shown in status

    # ---------------------------------------------------------------- loop control
    def wake(self) -> None:
        self._wake.set()

    def child_changed(self, kind: str, name: str, resource_version: str | None, deleted: bool) -> None:
        """A watch event on a child: re-apply unless it is the version our own last apply left."""
        if self.children.changed(kind, name, resource_version, deleted):
            self.wake()

    def route_changed(self, adapter: str, kind: str, resource_version: str | None, deleted: bool) -> None:
        """A watch event on an adapter's Service or EndpointSlice: rewrite it unless we wrote this version."""
        if adapter not in self.routes and adapter not in self._services:
            return
        if kind == "Service" or deleted or self._route_rv.get(adapter) != resource_version:
            self.routes.pop(adapter, None)
            self._services.discard(adapter)
            self.wake()

    async def run(self, get_view: Any, stopped: Any) -> None:
        """The daemon body: cycle, then sleep until woken or the interval passes."""
        from lorafleet.operator.rebalancer import Rebalancer

        rebalancer = Rebalancer(self)
        while not stopped:
            self._wake.clear()
            bm, adapters, pods = get_view()
            if bm is None:
                return
            t0 = time.monotonic()
            try:
                await self.cycle(bm, adapters, pods)
                if rebalancer.due():
                    await rebalancer.run(bm, adapters)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad cycle kill the daemon
                log.exception("reconcile of BaseModel %s/%s failed", self.ns, self.name)
                self.rt.metrics.reconcile_errors.labels("basemodel").inc()
            finally:
                self.rt.metrics.reconcile_seconds.labels("basemodel").observe(time.monotonic() - t0)
            await sleep_or_wake(self._wake, self.rt.config.interval)

    async def close(self) -> None:
        self.migrator.close()
        await self.observer.close()

    # ---------------------------------------------------------------- one cycle
    async def cycle(
        self, bm: Mapping[str, Any], adapter_bodies: list[dict[str, Any]], pods: list[Mapping[str, Any]]
    ) -> None:
        self.cycles += 1
        # observe
        if self.observer.token is None:
            token = await self.rt.kube.read_secret_value(self.ns, res.admin_secret_name(self.name), c.ADMIN_TOKEN_KEY)
            if token:
                self.observer.set_token(token)
        workers = self.observer.workers(bm, pods, self._retiring)
        await self.observer.probe(workers, {pod for _, pod in self.migrator.drains})
        await self._scale(bm, pods, workers)
        self.workers = workers
        usable = [w for w in workers if w.reachable and not w.draining]
        by_pod = {w.pod: w for w in workers}
        limits = (bm.get("spec") or {}).get("limits") or {}
        root = self.rt.config.adapter_root

        # decide
        def rank_of(body: dict[str, Any]) -> int | None:
            return decide.observed_rank(body["metadata"]["name"], decide.source_path(body, root), workers, self._ranks)

        views = decide.views(
            adapter_bodies,
            bm,
            workers,
            len(usable),
            autoscaler=self.autoscaler,
            check_sources=self.rt.config.check_sources,
            rank_of=rank_of,
            now=time.monotonic(),
        )
        draining = self.migrator.draining()
        current = decide.held(views, usable, draining)
        moves, self.moves_pending = decide.valid_moves(self.moves_pending, views, current, usable), []
        t0 = time.perf_counter()
        plan = decide.plan(views, current, usable, limits, self.migrator.blocked(time.monotonic()), adapter_bodies)
        self.rt.metrics.solve_seconds.labels(self.name, "incremental").observe(time.perf_counter() - t0)
        loads = [
            Load(a, pod, client, decide.source_path(views[a].body, root), views[a].body, by_pod[pod].node)
            for a, pod in plan.adds + [(a, dst) for a, _, dst in moves]
            if (client := by_pod[pod].client) is not None
        ]

        # act: one handoff for every load, route change and drain of this cycle
        async def route(loaded: set[tuple[str, str]]) -> list[Release]:
            for a, pod in loaded:
                current[a].add(pod)
            # a move's source is released only once its target really holds the adapter
            removes = plan.removes + [(a, src) for a, src, dst in moves if dst in current[a]]
            decision = decide.routing(views, workers, current, removes, draining, set(plan.removes))
            for name, view in views.items():
                if view.removed and not self.routes.get(name):
                    continue  # never create routing objects for an adapter nothing may serve
                try:
                    await self._route(bm, view, [by_pod[p] for p in decision.targets[name]])
                except Exception:  # one adapter's routing object must not stall the others
                    log.exception("routing of adapter %s failed", name)
                    self.rt.metrics.reconcile_errors.labels("routing").inc()
            return [
                Release(a, pod, w.client if (w := by_pod.get(pod)) and w.reachable else None, why, views[a].body)
                for a, pod, why in decision.releases
            ]

        await self.migrator.handoff(loads, route, alongside=self._reloads(views, usable))
        await self.status.adapters(views, by_pod)
        await self.status.basemodel(bm, workers, views, pods)
        for name, ev in list(self._gone.items()):
            if self.is_gone(name):
                ev.set()

    # ---------------------------------------------------------------- owned children and scale
    async def _scale(self, bm: Mapping[str, Any], pods: list[Mapping[str, Any]], workers: list[Worker]) -> None:
        """Decides the Deployment's replica count (a scale-down empties its victims first), marks the victims with
        the lowest pod-deletion-cost so the ReplicaSet removes exactly those, and applies the children."""
        target = int((bm.get("spec") or {}).get("replicas", 1))
        busy = self.migrator.busy_pods()
        running = {p["metadata"]["name"] for p in pods if pod_is_running(p)}
        held = {w.pod: len(w.adapters or {}) for w in workers}
        for pod, n in busy.items():
            held[pod] = held.get(pod, 0) + n
        ready = {w.pod for w in workers if w.reachable and w.pod in running}
        states = scaledown.pod_states(pods, held, ready, {w.pod: w.load.total_rate for w in workers if w.load})
        plan = scaledown.plan_scale(target, states, self._retiring)
        victims = set(plan.victims)
        for w in workers:
            if w.pod in victims:
                w.retiring = w.draining = True
        for st in states:
            mark = scaledown.VICTIM_COST if st.name in victims else None
            if st.terminating or (mark is not None) == st.marked:
                continue
            try:
                await self.rt.kube.patch_pod_annotations(self.ns, st.name, {scaledown.DELETION_COST: mark})
            except Exception as exc:  # noqa: BLE001 - retried next cycle
                log.warning("marking pod %s for scale-down failed: %s", st.name, exc)
        if victims - self._retiring:
            new = ", ".join(sorted(victims - self._retiring))
            self.event(bm, "Normal", "ScalingDown", f"emptying {new} before removal ({target} workers wanted)")
        self._retiring = victims
        self.scale = plan
        await self._reconcile_children(bm, plan.replicas)

    async def _reconcile_children(self, bm: Mapping[str, Any], replicas: int) -> None:
        """Applies the Secret, Deployment, Service and PDB when something may have drifted (see children.py)."""
        now = time.monotonic()
        key = (bm["metadata"].get("uid"), bm["metadata"].get("generation"), replicas)
        if not self.children.due(key, now):
            return
        self.children.start(key)
        result = await children.reconcile(self.rt.kube, bm, adapter_root=self.rt.config.adapter_root, replicas=replicas)
        self.children.applied(result, now)
        if result.token and result.token != self.observer.token:
            self.observer.set_token(result.token)
        keys = {f"ChildRejected:{f.kind}/{f.name}" for f in result.failures}
        for stale in [k for k in self._last_events if k[0] == self.name and k[1].startswith("ChildRejected:")]:
            if stale[1] not in keys:
                del self._last_events[stale]
        for f in result.failures:
            log.warning("BaseModel %s/%s: %s", self.ns, self.name, f.describe())
            self.event(bm, "Warning", "ChildRejected", f.describe(), key=f"ChildRejected:{f.kind}/{f.name}")

    # ---------------------------------------------------------------- actions
    def _reloads(self, views: dict[str, AdapterView], usable: list[Worker]) -> list[Any]:
        """In-place reloads for replicas whose weights came from another source than the spec now names (a new
        `spec.source.uri`, or a version a ContinualLearningJob published): new requests switch to the new weights,
        in-flight ones finish on the old. The trainer's own replica is left to the trainer. A refused reload leaves
        the previous weights serving and becomes the adapter's LoadFailed condition until the spec names another
        source or the reload succeeds."""
        jobs = []
        now = time.monotonic()
        for name, view in views.items():
            if view.removed:
                continue
            want = decide.source_path(view.body, self.rt.config.adapter_root)
            failed = self._reload_failed.get(name)
            if failed is not None and decide.reload_path(failed, want):
                self._forget_reload_failure(name)  # the spec moved on from the refused source
            trainer = (view.body["metadata"].get("annotations") or {}).get(c.ANNOT_TRAINER_POD)
            for w in usable:
                info = (w.adapters or {}).get(name)
                if w.stale or w.pod == trainer or info is None or not decide.reload_path(info.path, want):
                    continue
                path, when = self._reload_tried.get((name, w.pod), ("", 0.0))
                if path == want and when > now - 30.0:
                    continue  # the worker keeps reporting another path: do not hammer it with the same one
                self._reload_tried[(name, w.pod)] = (want, now)
                jobs.append(self._reload(view, w, want))
        return jobs

    def _forget_reload_failure(self, name: str) -> None:
        if self._reload_failed.pop(name, None) is not None:
            self.migrator.load_errors.pop(name, None)

    async def _reload(self, view: AdapterView, w: Worker, path: str) -> None:
        assert w.client is not None
        try:
            await w.client.load(view.name, path, inplace=True)
        except WorkerError as exc:
            self.rt.metrics.worker_errors.labels(self.name, "reload").inc()
            msg = f"worker {w.pod} refused {path} (HTTP {exc.status}), the previous version serves: {exc.message}"
            self.event(view.body, "Warning", "ReloadFailed", msg)
            if exc.status:  # the worker answered: the source is bad (an unreachable worker is its pod's matter)
                self._reload_failed[view.name] = path
                self.migrator.load_errors[view.name] = msg
            return
        self._forget_reload_failure(view.name)
        self.rt.metrics.loads.labels(self.name).inc()
        self.event(view.body, "Normal", "Reloaded", f"worker {w.pod} switched to {path}")

    async def _route(self, bm: Mapping[str, Any], view: AdapterView, targets: list[Worker]) -> None:
        """Writes the adapter's Service (once) and EndpointSlice: exactly `targets`, all Ready, none terminating."""
        name = view.name
        pods = [w.pod for w in targets]
        if self.routes.get(name) == pods and name in self._services:
            return
        port = res.worker_port(bm)
        if name not in self._services:
            await self.rt.kube.apply(res.adapter_service(view.body, port))
            self._services.add(name)
        slice_body = res.adapter_endpointslice(
            view.body,
            port,
            [res.RouteTarget(pod=w.pod, ip=w.ip or "", node=w.node, uid=w.uid) for w in targets if w.ip],
        )
        written = await self.rt.kube.apply(slice_body)
        self._route_rv[name] = str((written.get("metadata") or {}).get("resourceVersion", ""))
        before = self.routes.get(name)
        self.routes[name] = pods
        if before is not None:
            self.event(view.body, "Normal", "Routed", f"routing to {', '.join(pods) or 'no pods'}")

    def is_gone(self, adapter: str) -> bool:
        """No reachable worker holds the adapter and no drain of it is running."""
        if any(a == adapter for a, _ in self.migrator.drains):
            return False
        return not any(w.adapters and adapter in w.adapters for w in self.workers)

    async def wait_gone(self, adapter: str, timeout: float) -> bool:
        ev = self._gone.setdefault(adapter, asyncio.Event())
        self.wake()
        try:
            await asyncio.wait_for(ev.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._gone.pop(adapter, None)

    async def forget(self, adapter: str, body: Mapping[str, Any]) -> None:
        """Removes the adapter's routing objects once it is gone from every worker."""
        route = res.adapter_route_name(adapter)
        await self.rt.kube.delete("EndpointSlice", self.ns, route)
        await self.rt.kube.delete("Service", self.ns, route)
        self.routes.pop(adapter, None)
        self._route_rv.pop(adapter, None)
        self._services.discard(adapter)
        self.status.forget(adapter)
        self.migrator.forget(adapter)

    def event(self, body: Mapping[str, Any], type_: str, reason: str, message: str, *, key: str | None = None) -> None:
        """One aggregated Event (events.py) per distinct message; a state re-asserted every cycle (a failure that
        persists) is posted once, not once per cycle."""
        k = (body["metadata"]["name"], key or reason)
        if reason not in REPEATED_EVENTS:
            if self._last_events.get(k) == message:
                return
            self._last_events[k] = message
            if len(self._last_events) > 10000:
                self._last_events.clear()
        self.rt.event(body, type_, reason, message)
