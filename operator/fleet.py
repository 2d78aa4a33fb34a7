"""One BaseModel's fleet: observe workers, decide replicas, load, route, drain, and report — level-triggered.

Every cycle starts from what is true *now*: the pods the API server lists and what each reachable worker says it
holds (`/v1/adapters`). Nothing is remembered that could go stale across an operator restart except in-flight
drains, so a restarted operator converges to the same routing without loading anything twice. The cycle runs on a
short clock and is woken at once by adapter and pod events, which is what makes failover a matter of seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lorafleet.operator import assign, children, conditions, migration, podhealth, scaledown
from lorafleet.operator import constants as c
from lorafleet.operator import resources as res
from lorafleet.operator.autoscale import AutoScaler
from lorafleet.operator.capacity import adapter_sizes, worker_capacity
from lorafleet.operator.scrape import WorkerLoad
from lorafleet.operator.state import Runtime, sleep_or_wake
from lorafleet.operator.validation import Problem, adapter_path, adapter_rank, published_versions, validate_adapter
from lorafleet.operator.workerclient import AdapterInfo, WorkerClient, WorkerError, make_client

log = logging.getLogger(__name__)

ANNOT_DRAIN = "lorafleet.io/drain"
UNREACHABLE_GRACE = 3.0  # seconds a timing-out worker keeps its last known adapters


@dataclass
class Worker:
    pod: str
    uid: str | None
    ip: str | None
    node: str | None
    endpoint: str | None
    draining: bool
    client: WorkerClient | None = None
    adapters: dict[str, AdapterInfo] | None = None  # None: not reachable this cycle
    load: WorkerLoad | None = None
    stale: bool = False  # adapters are the last known ones (the latest probe timed out)
    retiring: bool = False  # picked by the scale-down plan: emptied, then removed by the ReplicaSet

    @property
    def reachable(self) -> bool:
        return self.adapters is not None

    def holds(self, adapter: str) -> bool:
        return bool(self.adapters and adapter in self.adapters and self.adapters[adapter].servable)


@dataclass
class AdapterView:
    """What one cycle decided about one adapter; becomes its status."""

    body: dict[str, Any]
    problems: list[Problem] = field(default_factory=list)
    desired: int = 0
    asked: int = 0
    deleting: bool = False
    rate: float = 0.0
    load_error: str | None = None

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]

    @property
    def fatal(self) -> Problem | None:
        return next((p for p in self.problems if p.fatal), None)


def pod_is_running(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    if pod.get("metadata", {}).get("deletionTimestamp") or status.get("phase") != "Running":
        return False
    ready = [cond for cond in status.get("conditions") or [] if cond.get("type") == "Ready"]
    return bool(status.get("podIP")) and (not ready or ready[0].get("status") == "True")


class BaseModelFleet:
    def __init__(self, runtime: Runtime, namespace: str, name: str) -> None:
        self.rt = runtime
        self.ns = namespace
        self.name = name
        self._wake = asyncio.Event()
        self.autoscaler = AutoScaler(runtime.config.per_replica_rate, runtime.config.scale_down_delay)
        self._clients: dict[tuple[str, str], WorkerClient] = {}
        self._token: str | None = None
        self._routes: dict[str, list[str]] = {}  # adapter -> pods last written to its EndpointSlice
        self._services: set[str] = set()
        self._drains: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._since: dict[tuple[str, str], str] = {}
        self._blocked: dict[tuple[str, str], float] = {}  # (adapter, pod) -> monotonic time when retry is allowed
        self._fail_count: dict[tuple[str, str], int] = {}
        self._load_errors: dict[str, str] = {}
        self._last_status: dict[str, dict[str, Any]] = {}
        self._last_events: dict[tuple[str, str], str] = {}
        self._loads: dict[str, WorkerLoad] = {}
        self._last_scrape = 0.0
        self._gone: dict[str, asyncio.Event] = {}
        self._last_seen: dict[str, tuple[float, dict[str, AdapterInfo]]] = {}
        self._reload_tried: dict[tuple[str, str], float] = {}
        self._ranks: dict[tuple[str, str], int] = {}  # (adapter, source path) -> rank a worker reported
        self.workers: list[Worker] = []
        self.cycles = 0
        self.moves_pending: list[tuple[str, str, str]] = []  # rebalancer moves (adapter, source, target)
        # owned children: applied when dirty (a watch event, a spec change, a new replica count) or on resync
        self._children_dirty = True
        self._children_due = 0.0
        self._children_key: tuple[Any, ...] | None = None
        self._child_rv: dict[tuple[str, str], str] = {}
        self.child_failures: list[children.ChildFailure] = []
        self._route_rv: dict[str, str] = {}  # adapter -> resourceVersion of the slice we last wrote
        self._retiring: set[str] = set()
        self.scale = scaledown.ScalePlan(0, ())
        self.last_solve: str | None = None  # short text of the last OR-Tools rebalance, shown in status

    # ---------------------------------------------------------------- loop control
    def wake(self) -> None:
        self._wake.set()

    def child_changed(self, kind: str, name: str, resource_version: str | None, deleted: bool) -> None:
        """A watch event on a child: re-apply unless it is the version our own last apply left."""
        if deleted or self._child_rv.get((kind, name)) != resource_version:
            self._children_dirty = True
            self.wake()

    def route_changed(self, adapter: str, kind: str, resource_version: str | None, deleted: bool) -> None:
        """A watch event on an adapter's Service or EndpointSlice: rewrite it unless we wrote this version."""
        if adapter not in self._routes and adapter not in self._services:
            return
        if kind == "Service" or deleted or self._route_rv.get(adapter) != resource_version:
            self._routes.pop(adapter, None)
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
        for task in self._drains.values():
            task.cancel()
        for client in self._clients.values():
            await client.aclose()

    # ---------------------------------------------------------------- observation
    async def _admin_token(self) -> str | None:
        if self._token is None:
            self._token = await self.rt.kube.read_secret_value(
                self.ns, res.admin_secret_name(self.name), c.ADMIN_TOKEN_KEY
            )
        return self._token

    def _endpoint(self, pod: Mapping[str, Any], port: int) -> str | None:
        if self.rt.config.local_endpoints:
            return (pod["metadata"].get("annotations") or {}).get(c.ANNOT_LOCAL_ENDPOINT)
        ip = (pod.get("status") or {}).get("podIP")
        return f"{ip}:{port}" if ip else None

    def _client(self, engine: str, pod: str, endpoint: str, token: str | None) -> WorkerClient:
        key = (pod, endpoint)
        if key not in self._clients:
            self._clients[key] = make_client(engine, f"http://{endpoint}", token, retries=2, backoff=0.1)
        return self._clients[key]

    async def observe(self, bm: Mapping[str, Any], pods: list[Mapping[str, Any]]) -> list[Worker]:
        port = res.worker_port(bm)
        engine = res.engine_of(bm)
        token = await self._admin_token()
        workers: list[Worker] = []
        for pod in pods:
            meta = pod["metadata"]
            if not pod_is_running(pod) and not meta.get("deletionTimestamp"):
                continue
            endpoint = self._endpoint(pod, port)
            w = Worker(
                pod=meta["name"],
                uid=meta.get("uid"),
                ip=(pod.get("status") or {}).get("podIP"),
                node=(pod.get("spec") or {}).get("nodeName"),
                endpoint=endpoint,
                draining=bool(meta.get("deletionTimestamp"))
                or (meta.get("annotations") or {}).get(ANNOT_DRAIN) == "true"
                or meta["name"] in self._retiring,
                retiring=meta["name"] in self._retiring,
            )
            if endpoint:
                w.client = self._client(engine, w.pod, endpoint, token)
            workers.append(w)
        scrape = time.monotonic() - self._last_scrape >= self.rt.config.metrics_every
        if scrape:
            self._last_scrape = time.monotonic()

        async def probe(w: Worker) -> None:
            if w.client is None:
                return
            try:
                w.adapters = {a.name: a for a in await w.client.adapters()}
                self._last_seen[w.pod] = (time.monotonic(), w.adapters)
            except WorkerError as exc:
                log.debug("worker %s unreachable: %s", w.pod, exc)
                self.rt.metrics.worker_errors.labels(self.name, "adapters").inc()
                # A slow answer (timeout) from a worker seen healthy moments ago is not a crash: keep its last
                # known adapters for a short grace so one busy second does not reshuffle routing. A refused
                # connection (process gone) or a 5xx is believed at once.
                seen = self._last_seen.get(w.pod)
                if "Timeout" in exc.message and seen and time.monotonic() - seen[0] < UNREACHABLE_GRACE:
                    w.adapters, w.stale = seen[1], True
                return
            if scrape:
                try:
                    self._loads[w.pod] = await w.client.load_report()
                except (WorkerError, ValueError):
                    self.rt.metrics.worker_errors.labels(self.name, "metrics").inc()
            w.load = self._loads.get(w.pod)

        await asyncio.gather(*(probe(w) for w in workers))
        for pod in [p for p in self._last_seen if p not in {w.pod for w in workers}]:
            del self._last_seen[pod]
        live = {(w.pod, w.endpoint) for w in workers}
        busy = {pod for _, pod in self._drains}  # a running drain still owns its client
        for key in [k for k in self._clients if k not in live and k[0] not in busy]:
            await self._clients.pop(key).aclose()
        return workers

    # ---------------------------------------------------------------- one cycle
    async def cycle(
        self, bm: Mapping[str, Any], adapter_bodies: list[dict[str, Any]], pods: list[Mapping[str, Any]]
    ) -> None:
        self.cycles += 1
        workers = await self.observe(bm, pods)
        await self._scale(bm, pods, workers)
        self.workers = workers
        usable = [w for w in workers if w.reachable and not w.draining]
        by_pod = {w.pod: w for w in workers}
        limits = (bm.get("spec") or {}).get("limits") or {}
        room = worker_capacity(limits)  # the rebalancer's capacity model: slots and adapter-weight bytes

        views: dict[str, AdapterView] = {}
        for body in adapter_bodies:
            view = AdapterView(body=body)
            view.deleting = bool(body["metadata"].get("deletionTimestamp"))
            view.rate = sum((w.load.adapter_rate.get(view.name, 0.0) if w.load else 0.0) for w in workers)
            view.problems = validate_adapter(
                body,
                bm,
                workers=int((bm.get("spec") or {}).get("replicas", 1)),
                check_local_sources=self.rt.config.check_sources,
                observed_rank=self._observed_rank(view, workers),
            )
            if not view.deleting and view.fatal is None:
                view.desired, view.asked = self.autoscaler.decide(
                    view.name, body.get("spec") or {}, view.rate, len(usable), time.monotonic()
                )
            else:
                self.autoscaler.forget(view.name)
            views[view.name] = view

        draining_pairs = set(self._drains)
        current: dict[str, set[str]] = {}
        for name in views:
            current[name] = {w.pod for w in usable if w.holds(name) and (name, w.pod) not in draining_pairs}
        now = time.monotonic()
        blocked: dict[str, set[str]] = {}
        for (a, p), until in list(self._blocked.items()):
            if until > now:
                blocked.setdefault(a, set()).add(p)
            else:
                del self._blocked[(a, p)]
        # Rebalancer moves: add on the target now; the source becomes surplus and is drained below.
        moves, self.moves_pending = self.moves_pending, []
        valid_moves = [
            (a, src, dst)
            for a, src, dst in moves
            if a in views and src in current.get(a, set()) and dst in {w.pod for w in usable} and dst not in current[a]
        ]
        move_targets = [(a, dst) for a, _, dst in valid_moves]
        slots = [
            assign.WorkerSlot(
                name=w.pod,
                node=w.node,
                capacity=0 if w.stale else room.slots,  # a timing-out worker keeps what it has, takes nothing new
                memory_bytes=room.memory_bytes,
                max_rank=int(limits["maxRank"]) if limits.get("maxRank") else None,
                load=(w.load.total_rate if w.load else 0.0),
            )
            for w in usable
        ]
        t0 = time.perf_counter()
        desired = {n: v.desired for n, v in views.items()}
        ranks = {n: adapter_rank(v.body) or 0 for n, v in views.items()}
        prio = {n: int((v.body.get("spec") or {}).get("priority") or 0) for n, v in views.items()}
        plan = assign.plan(
            current,
            desired,
            slots,
            rates={n: v.rate for n, v in views.items()},
            ranks=ranks,
            priority=prio,
            blocked=blocked,
            sizes=adapter_sizes(adapter_bodies, [w.adapters for w in usable]),
        )
        self.rt.metrics.solve_seconds.labels(self.name, "incremental").observe(time.perf_counter() - t0)
        adds = plan.adds + move_targets

        # (1) load on targets, concurrently
        async def load(a: str, pod: str) -> None:
            w = by_pod[pod]
            assert w.client is not None
            view = views[a]
            path = self._source_path(view)
            try:
                await w.client.load(a, path)
            except WorkerError as exc:
                self.rt.metrics.worker_errors.labels(self.name, "load").inc()
                n = self._fail_count.get((a, pod), 0) + 1
                self._fail_count[(a, pod)] = n
                self._blocked[(a, pod)] = time.monotonic() + min(0.5 * 2**n, 30.0)
                if exc.status:
                    self._load_errors[a] = f"worker {pod} refused the adapter (HTTP {exc.status}): {exc.message}"
                    self._event(view.body, "Warning", "LoadFailed", self._load_errors[a])
                return
            self.rt.metrics.loads.labels(self.name).inc()
            self._fail_count.pop((a, pod), None)
            self._load_errors.pop(a, None)
            current[a].add(pod)
            self._since[(a, pod)] = conditions.now_iso()
            self._event(view.body, "Normal", "Loaded", f"loaded on worker {pod} (node {by_pod[pod].node})")

        await asyncio.gather(*(load(a, p) for a, p in adds), *self._reloads(views, usable))
        # a move's source is released only once its target really holds the adapter
        removes = plan.removes + [(a, src) for a, src, dst in valid_moves if dst in current[a]]

        # (2)+(3) routing: exactly the ready pods that hold the adapter, minus replicas about to be drained.
        removing = set(removes)
        to_drain: list[tuple[str, str]] = list(removes)
        for w in workers:
            if not w.draining or not w.adapters:
                continue
            for a in w.adapters:
                if a not in views or (a, w.pod) in self._drains or not w.holds(a):
                    continue
                if current.get(a) or views[a].deleting or views[a].fatal:
                    to_drain.append((a, w.pod))  # a replacement is routed (or nothing should serve): drain it
                else:
                    current.setdefault(a, set()).add(w.pod)  # keep serving until a replacement exists
        for name, view in views.items():
            if view.deleting or view.fatal:
                for w in workers:
                    if w.holds(name) and (name, w.pod) not in self._drains:
                        to_drain.append((name, w.pod))
                if self._routes.get(name):  # un-route first; never create routing objects for it
                    await self._route(bm, view, [])
                continue
            targets = {p for p in current.get(name, set()) if (name, p) not in removing}
            try:
                await self._route(bm, view, [by_pod[p] for p in sorted(targets)])
            except Exception:  # one adapter's routing object must not stall the others
                log.exception("routing of adapter %s failed", name)
                self.rt.metrics.reconcile_errors.labels("routing").inc()

        # (4)-(6) drain and unload in the background so one slow request never stalls the fleet.
        for a, pod in dict.fromkeys(to_drain):
            if (a, pod) in self._drains:
                continue
            w = by_pod.get(pod)
            if views[a].deleting:
                reason = "deleted"
            elif views[a].fatal:
                reason = "invalid"
            elif w and w.draining:
                reason = "drain"
            elif (a, pod) in plan.removes:
                reason = "scale-down"
            else:
                reason = "rebalance"
            self._drains[(a, pod)] = asyncio.create_task(self._drain(a, w, reason, views[a].body))

        await self._write_adapter_statuses(bm, views, by_pod, plan)
        await self._write_basemodel_status(bm, workers, views, pods)
        for name, ev in list(self._gone.items()):
            if self.is_gone(name):
                ev.set()

    # ---------------------------------------------------------------- owned children and scale
    async def _scale(self, bm: Mapping[str, Any], pods: list[Mapping[str, Any]], workers: list[Worker]) -> None:
        """Decides the Deployment's replica count (a scale-down empties its victims first), marks the victims with
        the lowest pod-deletion-cost so the ReplicaSet removes exactly those, and applies the children."""
        target = int((bm.get("spec") or {}).get("replicas", 1))
        by_pod = {w.pod: w for w in workers}
        busy: dict[str, int] = {}
        for _, pod in self._drains:
            busy[pod] = busy.get(pod, 0) + 1
        states = []
        for pod in pods:
            meta = pod["metadata"]
            w = by_pod.get(meta["name"])
            states.append(
                scaledown.PodState(
                    name=meta["name"],
                    ready=w is not None and w.reachable and pod_is_running(pod),
                    adapters=len((w.adapters or {}) if w else {}) + busy.get(meta["name"], 0),
                    load=w.load.total_rate if w is not None and w.load else 0.0,
                    template_hash=(meta.get("labels") or {}).get("pod-template-hash"),
                    terminating=bool(meta.get("deletionTimestamp")),
                    marked=(meta.get("annotations") or {}).get(scaledown.DELETION_COST) == scaledown.VICTIM_COST,
                )
            )
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
            self._event(
                bm,
                "Normal",
                "ScalingDown",
                f"emptying {', '.join(sorted(victims - self._retiring))} before removal ({target} workers wanted)",
            )
        self._retiring = victims
        self.scale = plan
        await self._reconcile_children(bm, plan.replicas)

    async def _reconcile_children(self, bm: Mapping[str, Any], replicas: int) -> None:
        """Applies the Secret, Deployment, Service and PDB when something may have drifted (see children.py)."""
        now = time.monotonic()
        key = (bm["metadata"].get("uid"), bm["metadata"].get("generation"), replicas)
        if not self._children_dirty and key == self._children_key and now < self._children_due:
            return
        self._children_dirty = False
        self._children_key = key
        result = await children.reconcile(self.rt.kube, bm, adapter_root=self.rt.config.adapter_root, replicas=replicas)
        self._children_due = now + (5.0 if result.failures else self.rt.config.resync_interval)
        self._child_rv.update(result.versions)
        if result.token and result.token != self._token:
            self._token = result.token
            for client in self._clients.values():
                client.token = result.token
        keys = {f"ChildRejected:{f.kind}/{f.name}" for f in result.failures}
        for stale in [k for k in self._last_events if k[0] == self.name and k[1].startswith("ChildRejected:")]:
            if stale[1] not in keys:
                del self._last_events[stale]
        for f in result.failures:
            log.warning("BaseModel %s/%s: %s", self.ns, self.name, f.describe())
            self._event(bm, "Warning", "ChildRejected", f.describe(), key=f"ChildRejected:{f.kind}/{f.name}")
        self.child_failures = result.failures

    # ---------------------------------------------------------------- actions
    def _observed_rank(self, view: AdapterView, workers: list[Worker]) -> int | None:
        """The rank a worker reported for this adapter's current source, remembered per source so an adapter
        unloaded for a wrong rank is not loaded again just to find out once more."""
        path = self._source_path(view)
        for w in workers:
            info = (w.adapters or {}).get(view.name)
            if info is not None and info.rank and (not info.path or info.path == path):
                self._ranks[(view.name, path)] = int(info.rank)
        return self._ranks.get((view.name, path))

    def _source_path(self, view: AdapterView) -> str:
        """Where this adapter's weights come from now: a pinned published version (`spec.version`), else the
        newest version a ContinualLearningJob published, else the spec's source."""
        pin = (view.body.get("spec") or {}).get("version")
        if pin:
            return published_versions(view.body).get(str(pin), "")
        published = (view.body["metadata"].get("annotations") or {}).get(c.ANNOT_PUBLISHED_SOURCE)
        if published:
            return published
        uri = str(((view.body.get("spec") or {}).get("source") or {}).get("uri", ""))
        return adapter_path(uri, self.rt.config.adapter_root)

    def _reloads(self, views: dict[str, AdapterView], usable: list[Worker]) -> list[Any]:
        """In-place reloads for replicas whose weights came from another source than the spec now names (a new
        `spec.source.uri`, or a version a ContinualLearningJob published): new requests switch to the new weights,
        in-flight ones finish on the old. The trainer's own replica is left to the trainer."""
        jobs = []
        now = time.monotonic()
        for name, view in views.items():
            if view.deleting or view.fatal:
                continue
            want = os.path.normpath(self._source_path(view))
            trainer = (view.body["metadata"].get("annotations") or {}).get(c.ANNOT_TRAINER_POD)
            for w in usable:
                info = (w.adapters or {}).get(name)
                if w.stale or w.pod == trainer or info is None or not info.path or os.path.normpath(info.path) == want:
                    continue
                if self._reload_tried.get((name, w.pod), 0.0) > now - 30.0:
                    continue  # the worker keeps reporting another path: do not hammer it
                self._reload_tried[(name, w.pod)] = now
                jobs.append(self._reload(view, w, want))
        return jobs

    async def _reload(self, view: AdapterView, w: Worker, path: str) -> None:
        assert w.client is not None
        try:
            await w.client.load(view.name, path, inplace=True)
        except WorkerError as exc:
            self.rt.metrics.worker_errors.labels(self.name, "reload").inc()
            self._event(view.body, "Warning", "ReloadFailed", f"worker {w.pod}: {exc.message}")
            return
        self.rt.metrics.loads.labels(self.name).inc()
        self._event(view.body, "Normal", "Reloaded", f"worker {w.pod} switched to {path}")

    async def _route(self, bm: Mapping[str, Any], view: AdapterView, targets: list[Worker]) -> None:
        name = view.name
        pods = [w.pod for w in targets]
        if self._routes.get(name) == pods and name in self._services:
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
        before = self._routes.get(name)
        self._routes[name] = pods
        if before is not None:
            self._event(view.body, "Normal", "Routed", f"routing to {', '.join(pods) or 'no pods'}")

    async def _drain(self, adapter: str, worker: Worker | None, reason: str, body: dict[str, Any]) -> None:
        try:
            client = worker.client if worker and worker.reachable else None
            seconds, timed_out = await migration.drain_and_unload(
                client, adapter, grace=self.rt.config.drain_grace, timeout=self.rt.config.drain_timeout
            )
            if client is not None:
                self.rt.metrics.unloads.labels(self.name).inc()
            if reason in ("drain", "rebalance"):  # a handoff to another worker, not a removal
                self.rt.metrics.migrations.labels(self.name, reason).inc()
            pod = worker.pod if worker else "?"
            self._since.pop((adapter, pod), None)
            msg = f"unloaded from worker {pod} after {seconds:.2f}s drain ({reason})"
            if timed_out:
                msg += "; drain timed out, in-flight requests finish on the old replica"
            self._event(body, "Normal", "Unloaded", msg)
        except WorkerError as exc:
            self.rt.metrics.worker_errors.labels(self.name, "unload").inc()
            log.warning("unload of %s from %s failed: %s", adapter, worker.pod if worker else "?", exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("drain of %s failed", adapter)
        finally:
            self._drains.pop((adapter, worker.pod if worker else "?"), None)
            self.wake()

    def is_gone(self, adapter: str) -> bool:
        """No reachable worker holds the adapter and no drain of it is running."""
        if any(a == adapter for a, _ in self._drains):
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
        self._routes.pop(adapter, None)
        self._route_rv.pop(adapter, None)
        self._services.discard(adapter)
        self._last_status.pop(adapter, None)
        self._load_errors.pop(adapter, None)

    def _event(self, body: Mapping[str, Any], type_: str, reason: str, message: str, *, key: str | None = None) -> None:
        """One aggregated Event (events.py) per distinct message; a state re-asserted every cycle (a failure that
        persists) is posted once, not once per cycle."""
        k = (body["metadata"]["name"], key or reason)
        if reason not in {"Loaded", "Unloaded", "Routed", "Reloaded"}:
            if self._last_events.get(k) == message:
                return
            self._last_events[k] = message
            if len(self._last_events) > 10000:
                self._last_events.clear()
        self.rt.event(body, type_, reason, message)

    # ---------------------------------------------------------------- status
    async def _write_adapter_statuses(
        self, bm: Mapping[str, Any], views: dict[str, AdapterView], by_pod: dict[str, Worker], plan: assign.Plan
    ) -> None:
        for name, view in views.items():
            if view.deleting:
                continue
            body = view.body
            meta = body["metadata"]
            old = body.get("status") or {}
            routed = self._routes.get(name, [])
            placements = []
            for pod in routed:
                w = by_pod.get(pod)
                since = self._since.setdefault((name, pod), self._old_since(old, pod) or conditions.now_iso())
                placements.append({"pod": pod, "node": (w.node if w else None) or "", "since": since, "ready": True})
            versions = {
                w.adapters[name].version
                for pod in routed
                if (w := by_pod.get(pod)) and w.adapters and name in w.adapters
            }
            conds = old.get("conditions") or []
            gen = meta.get("generation")
            fatal = view.fatal
            soft = [p for p in view.problems if not p.fatal]
            load_error = self._load_errors.get(name)
            if fatal:
                phase = "Failed"
                conds = conditions.set_condition(conds, "Ready", False, fatal.reason, fatal.message, gen)
                conds = conditions.set_condition(conds, "Placed", False, fatal.reason, fatal.message, gen)
                self._event(body, "Warning", fatal.reason, fatal.message)
            else:
                n = len(routed)
                if n == 0:
                    phase = "Pending" if not load_error else "Failed"
                    reason = "LoadFailed" if load_error else ("NoWorkers" if not by_pod else "Placing")
                    msg = load_error or "waiting for a worker to load the adapter"
                    conds = conditions.set_condition(conds, "Ready", False, reason, msg, gen)
                else:
                    phase = "Ready"
                    conds = conditions.set_condition(conds, "Ready", True, "Routable", f"served by {n} worker(s)", gen)
                placed = n >= view.desired and view.desired > 0
                conds = conditions.set_condition(
                    conds,
                    "Placed",
                    placed,
                    "ReplicasPlaced" if placed else "ReplicasPending",
                    f"{n}/{view.asked} replicas placed",
                    gen,
                )
            degraded = soft[0] if soft else None
            if degraded is None and load_error and not fatal:
                degraded = Problem("LoadFailed", load_error, fatal=False)
            if degraded is not None:
                conds = conditions.set_condition(conds, "Degraded", True, degraded.reason, degraded.message, gen)
                self._event(body, "Warning", degraded.reason, degraded.message)
            else:
                conds = conditions.set_condition(conds, "Degraded", False, "AsExpected", "", gen)
            status: dict[str, Any] = {
                "observedGeneration": gen,
                "phase": phase,
                "placements": placements,
                "requestRate": round(view.rate, 1),  # coarse: EWMA jitter must not cause a write every scrape
                "message": (fatal or degraded).message
                if (fatal or degraded)
                else f"{len(routed)}/{view.asked} replicas",
                "conditions": conds,
            }
            if versions - {None}:
                status["version"] = str(sorted(v for v in versions if v is not None)[-1])
            compare = {k: v for k, v in status.items() if k != "conditions"}
            last = self._last_status.get(name)
            if last is not None and last["cmp"] == compare and conditions.same_ignoring_time(last["conds"], conds):
                continue
            if last is None and self._same_as_body(old, compare, conds):
                self._last_status[name] = {"cmp": compare, "conds": conds}
                continue
            await self.rt.kube.patch_status(c.ADAPTERS, self.ns, name, status)
            self._last_status[name] = {"cmp": compare, "conds": conds}

    @staticmethod
    def _old_since(old_status: Mapping[str, Any], pod: str) -> str | None:
        for p in old_status.get("placements") or []:
            if p.get("pod") == pod:
                return p.get("since")
        return None

    @staticmethod
    def _same_as_body(old: Mapping[str, Any], compare: Mapping[str, Any], conds: list[dict[str, Any]]) -> bool:
        return all(old.get(k) == v for k, v in compare.items()) and conditions.same_ignoring_time(
            old.get("conditions"), conds
        )

    async def _write_basemodel_status(
        self,
        bm: Mapping[str, Any],
        workers: list[Worker],
        views: dict[str, AdapterView],
        pods: list[Mapping[str, Any]],
    ) -> None:
        spec = bm.get("spec") or {}
        meta = bm["metadata"]
        gen = meta.get("generation")
        ready = [w for w in workers if w.reachable and not w.draining]
        want = int(spec.get("replicas", 1))
        limits = spec.get("limits") or {}
        per_worker = []
        slots = worker_capacity(limits).slots
        for w in sorted(workers, key=lambda w: w.pod):
            count = len([a for a in (w.adapters or {}) if (w.adapters or {})[a].servable])
            self.rt.metrics.placements.labels(self.name, w.pod).set(count)
            per_worker.append(
                {
                    "pod": w.pod,
                    "node": w.node or "",
                    "ready": w.reachable and not w.draining,
                    "adapterSlots": slots,
                    "slotsUsed": count,
                    "load": round(w.load.total_rate, 3) if w.load else 0.0,
                }
            )
        self.rt.metrics.workers_ready.labels(self.name).set(len(ready))
        old = bm.get("status") or {}
        conds = old.get("conditions") or []
        if ready:
            conds = conditions.set_condition(
                conds, "Ready", True, "WorkersReady", f"{len(ready)}/{want} workers ready", gen
            )
        else:
            conds = conditions.set_condition(conds, "Ready", False, "NoReadyWorkers", f"0/{want} workers ready", gen)
        degraded = self._basemodel_problem(want, ready, pods)
        if degraded is not None and degraded.reason not in ("WorkersMissing", "ChildRejected"):
            self._event(bm, "Warning", degraded.reason, degraded.message)
        conds = conditions.set_condition(
            conds,
            "Degraded",
            degraded is not None,
            degraded.reason if degraded else "AsExpected",
            degraded.message if degraded else "",
            gen,
        )
        live = [v for v in views.values() if not v.deleting and not v.fatal]
        placed = len([v for v in live if self._routes.get(v.name)])
        msg = f"{placed}/{len(live)} adapters placed"
        if self.last_solve is not None:
            msg += f"; last rebalance {self.last_solve}"
        conds = conditions.set_condition(
            conds, "Placed", placed == len(live), "AllPlaced" if placed == len(live) else "Placing", msg, gen
        )
        status = {
            "observedGeneration": gen,
            "readyWorkers": len(ready),
            "workers": per_worker,
            "conditions": conds,
            "message": (degraded.message if degraded else f"{len(ready)}/{want} workers ready; {msg}")[:1024],
        }
        compare = {k: v for k, v in status.items() if k not in {"conditions", "workers"}}
        compare["workers"] = [{k: v for k, v in w.items() if k != "load"} for w in per_worker]
        last = self._last_status.get(f"\0bm:{self.name}")
        if last is not None and last["cmp"] == compare and conditions.same_ignoring_time(last["conds"], conds):
            if time.monotonic() - last["t"] < 30:
                return
        await self.rt.kube.patch_status(c.BASEMODELS, self.ns, self.name, status)
        self._last_status[f"\0bm:{self.name}"] = {"cmp": compare, "conds": conds, "t": time.monotonic()}

    def _basemodel_problem(self, want: int, ready: list[Worker], pods: list[Mapping[str, Any]]) -> Problem | None:
        """What the BaseModel's Degraded condition says, most actionable first: a child the API server refused,
        then a worker pod that cannot start (unschedulable, image pull, crash loop), then missing workers."""
        if self.child_failures:
            first = self.child_failures[0]
            more = f" (+{len(self.child_failures) - 1} more)" if len(self.child_failures) > 1 else ""
            return Problem("ChildRejected", first.describe() + more, fatal=False)
        pod_issues = podhealth.pod_problems(pods)
        if pod_issues:
            return pod_issues[0]
        if len(ready) < want:
            return Problem("WorkersMissing", f"{want - len(ready)} worker(s) not ready", fatal=False)
        return None
