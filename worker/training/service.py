"""The worker's training service: feedback intake, the served-request log, jobs, and their engine plugin.

Why one object per worker: it owns the durable feedback log and the jobs, and it is the worker's one
`IterationPlugin` (engine/plugin.py, registered by `worker/main.py`): it records prompt K/V after prefill steps
for the activation stash, and runs co-serving pieces after each step. All training runs in the engine thread:
during traffic from those callbacks (leftover budget, FlexLLM), when idle from a driver thread that asks the
engine thread (`runner.call`) for a slice of the whole budget. Job specs are persisted next to
the feedback log, so a restarted worker resumes its jobs and retrains nothing it already lost: every accepted
feedback sample is in the log (written and fsynced before the 2xx).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from collections import OrderedDict
from pathlib import Path

from lorafleet.worker.durable import write_atomic
from lorafleet.worker.feedback.store import FeedbackSample, FeedbackStore, PeerFeedbackLogs
from lorafleet.worker.paths import within
from lorafleet.worker.training.coserve import CoServePlugin
from lorafleet.worker.training.job import ContinualLearningJob
from lorafleet.worker.training.metrics import TrainingMetrics
from lorafleet.worker.training.replay import builtin_general_text, chunk_tokens
from lorafleet.worker.training.spec import JobRequest
from lorafleet.worker.training.stash import PrefillRecorder

log = logging.getLogger(__name__)
PEER_POLL_S = 0.5  # how often a trainer reads the feedback its pool's other workers accepted


class JobConflict(Exception):
    pass


def worker_id() -> str:
    """This worker's name within its pool: the pod name (LORAFLEET_WORKER_ID, set by the operator through the
    downward API), else the host name. Used as a directory name, so anything else is replaced."""
    raw = os.environ.get("LORAFLEET_WORKER_ID") or socket.gethostname() or "worker"
    return re.sub(r"[^A-Za-z0-9._-]", "_", raw)[:253].lstrip(".") or "worker"


class TrainingService(CoServePlugin):
    def __init__(self, runner, registry=None, data_dir: str | Path | None = None, request_log_size: int = 50_000):
        super().__init__([], metrics=TrainingMetrics(registry))
        self.runner = runner
        self.jobs: dict[str, ContinualLearningJob] = {}  # by name (the plugin's `running` reads it)
        self._requests: OrderedDict[str, object] = OrderedDict()
        self._request_log_size = request_log_size
        self._lock = threading.RLock()
        self._data_dir_arg = data_dir
        self.data_dir: Path | None = None
        self.versions_root: Path | None = None
        self.checkpoint_dir: Path | None = None
        self.sink = None  # a sources.publish.VersionSink (worker/main.py): where store-backed adapters' versions go
        self.feedback: FeedbackStore | None = None
        self.peers: PeerFeedbackLogs | None = None  # the pool's other workers' feedback logs (shared adapter store)
        self._peers_polled = 0.0
        self._peer_jobs_read = float("-inf")
        self._peer_job_adapters: frozenset[str] = frozenset()
        self.feedback_labels: set[str] = set()  # adapters with their own feedback metric series (the API caps it)
        self._replay_domains: dict[str, list[list[int]]] | None = None
        self._ready = threading.Event()
        self._attached = threading.Event()
        self._stop = threading.Event()
        self._work = threading.Event()
        self.setup_error: str | None = None
        self._thread = threading.Thread(target=self._main, name="lorafleet-training", daemon=True)
        self._thread.start()

    # ---- setup ----
    def _main(self) -> None:
        try:
            while not self._attached.wait(1.0):
                if self._stop.is_set() or (self.runner.error is not None):
                    return
            if self.setup_error is not None:
                return
            self._resume_jobs()
        except Exception as exc:  # noqa: BLE001 - training must never take serving down
            log.exception("training service failed to start")
            self.setup_error = repr(exc)
            return
        finally:
            self._ready.set()
        self._idle_driver()

    # ---- the engine plugin (coserve.CoServePlugin; engine thread) ----
    def attach(self, engine) -> None:
        try:
            self._install(engine)
        except Exception as exc:
            self.setup_error = repr(exc)
            raise
        finally:
            self._attached.set()

    def running(self) -> list[ContinualLearningJob]:
        return [j for j in list(self.jobs.values()) if j.phase == "Running"]

    def _install(self, engine) -> None:
        cfg = engine.config
        if self._data_dir_arg is not None:
            data = Path(self._data_dir_arg)
        elif os.environ.get("LORAFLEET_TRAINING_DIR"):
            data = Path(os.environ["LORAFLEET_TRAINING_DIR"])
        elif cfg.adapter_roots:
            # The adapter store is shared by the pool's workers: checkpoints live there for all (a job moved to
            # another worker resumes from them); the job registry and feedback log are this worker's own, or every
            # worker that restarts would resume every job of the pool (two trainers on one adapter).
            shared = Path(cfg.adapter_roots[0]) / ".lorafleet-training"
            data = shared / "workers" / worker_id()
            self.checkpoint_dir = shared / "checkpoints"
            self.peers = PeerFeedbackLogs(shared / "workers", data)
        else:
            from lorafleet.worker.loader import CACHE_ROOT

            data = CACHE_ROOT / "training" / Path(str(cfg.model)).name
        data.mkdir(parents=True, exist_ok=True)
        (data / "jobs").mkdir(exist_ok=True)
        if cfg.adapter_roots:
            versions = Path(cfg.adapter_roots[0])
        else:
            versions = data / "adapters"
            versions.mkdir(exist_ok=True)
            engine.store.allow_root(versions)
        self.data_dir, self.versions_root = data, versions
        self.checkpoint_dir = self.checkpoint_dir or data / "checkpoints"
        self.feedback = FeedbackStore(data / "feedback.log")  # migrates a feedback.jsonl found there
        self.feedback.subscribe(self._on_feedback)
        if self.peers is not None:
            self.peers.prime()  # before any job: jobs read what is there, polls what comes after
        tok = engine.tokenizer
        self._replay_domains = {
            d: chunk_tokens(tok(text, add_special_tokens=False)["input_ids"], 128)
            for d, text in builtin_general_text().items()
        }
        self.engine = engine
        self.recorder = PrefillRecorder(self._record_lookup, engine.model.shape.num_layers)

    def wait_ready(self, timeout: float = 120.0) -> bool:
        return self._ready.wait(timeout) and self.setup_error is None

    def close(self) -> None:
        self._stop.set()
        self._work.set()
        self._thread.join(5)
        if self.feedback is not None:
            self.feedback.close()

    # ---- served requests (engine thread) ----
    def on_finish(self, rec) -> None:
        with self._lock:
            self._requests[rec.request_id] = rec
            while len(self._requests) > self._request_log_size:
                self._requests.popitem(last=False)
        if rec.lora_name is not None:
            job = self._job_for(rec.lora_name)
            if job is not None and job.stash is not None and rec.finish_reason == "abort":
                job.stash.abort(rec.request_id)

    def finished_request(self, request_id: str):
        with self._lock:
            return self._requests.get(request_id)

    # ---- feedback (HTTP threads) ----
    def add_feedback(self, sample: FeedbackSample) -> FeedbackSample:
        assert self.feedback is not None
        return self.feedback.append(sample)  # the API counts it (with a bounded adapter label)

    def has_job_for(self, adapter: str) -> bool:
        """Whether a job trains `adapter` here or on another worker of the pool (their persisted job specs in the
        shared store, read at most every PEER_POLL_S): feedback for it is accepted by any replica."""
        if any(j.spec.adapter == adapter for j in list(self.jobs.values())):
            return True
        if self.peers is None:
            return False
        now = time.monotonic()
        if now - self._peer_jobs_read >= PEER_POLL_S:
            self._peer_jobs_read = now
            self._peer_job_adapters = self._read_peer_job_adapters()
        return adapter in self._peer_job_adapters

    def _read_peer_job_adapters(self) -> frozenset[str]:
        assert self.peers is not None
        found: set[str] = set()
        for p in self.peers.dir.glob("*/jobs/*.json"):
            try:
                within(self.peers.dir, p)
                found.add(str(json.loads(p.read_text()).get("adapter", "")))
            except (OSError, ValueError, AttributeError):
                continue  # being replaced, or not a job spec: the next read sees it
        return frozenset(found)

    def _on_feedback(self, s: FeedbackSample) -> None:
        job = self._job_for(s.adapter)
        if job is not None:
            job.offer(s)
            self._work.set()

    # ---- jobs ----
    def _job_for(self, adapter: str) -> ContinualLearningJob | None:
        with self._lock:
            for j in self.jobs.values():
                if j.spec.adapter == adapter and j.phase == "Running":
                    return j
        return None

    def _record_lookup(self, adapter: str):
        job = self._job_for(adapter)
        if job is None or job.stash is None:
            return None
        return job.stash, job.version_step

    def create_job(self, req: JobRequest, persist: bool = True) -> ContinualLearningJob:
        """Must be called in the engine thread (it reads the adapter store and may publish v1)."""
        spec = req.to_spec()
        with self._lock:
            if spec.name in self.jobs:
                raise JobConflict(f"job {spec.name!r} exists")
            if any(j.spec.adapter == spec.adapter for j in self.jobs.values()):
                raise JobConflict(f"adapter {spec.adapter!r} already has a job")
        assert self.versions_root is not None and self.feedback is not None and self._replay_domains is not None
        assert self.data_dir is not None and self.checkpoint_dir is not None
        # the names were validated by JobRequest; they become directories, so a planted symlink must not lead out
        within(self.versions_root, self.versions_root / spec.adapter)
        within(self.checkpoint_dir, self.checkpoint_dir / spec.adapter)
        job = ContinualLearningJob(
            spec, self.engine, self.versions_root, self._replay_domains, self.metrics, self.checkpoint_dir, self.sink
        )
        for s in self.feedback.samples(spec.adapter, spec.since_seq):
            job.offer(s)
        if self.peers is not None:  # accepted by the pool's other replicas (and by this job's earlier trainers)
            for s in self.peers.read_all(spec.adapter):
                job.offer(s)
        with self._lock:
            self.jobs[spec.name] = job
        if persist:
            assert self.data_dir is not None
            write_atomic(self.data_dir / "jobs" / f"{spec.name}.json", req.model_dump_json().encode())
        self._work.set()
        return job

    def delete_job(self, name: str) -> dict | None:
        """Engine thread: stops the job between iterations; published versions stay."""
        with self._lock:
            job = self.jobs.pop(name, None)
        if job is None:
            return None
        job.stop()
        if self.data_dir is not None:
            (self.data_dir / "jobs" / f"{name}.json").unlink(missing_ok=True)
        return job.status()

    def _resume_jobs(self) -> None:
        assert self.data_dir is not None
        for p in sorted((self.data_dir / "jobs").glob("*.json")):
            try:
                req = JobRequest.model_validate_json(p.read_text())
                self.runner.call_threadsafe(lambda e, r=req: self.create_job(r, persist=False)).result()
                log.info("resumed training job %s", req.name)
            except Exception:  # noqa: BLE001 - a bad persisted spec must not block the others
                log.exception("cannot resume job from %s", p)

    # ---- co-serving (engine thread) ----
    def work(self, job: ContinualLearningJob, budget: float, idle: bool = False) -> float:
        """A failing job is marked Failed; it never raises into the engine loop (serving must go on)."""
        try:
            return job.work_idle(budget) if idle else job.work(budget)
        except Exception as exc:  # noqa: BLE001
            log.exception("training job %s failed", job.spec.name)
            job.phase = "Failed"
            job.message = f"training failed: {exc!r}"
            job.stop()  # keeps the phase: it is no longer Running
            return 0.0

    def _idle_slice(self, engine) -> float:
        if engine.has_unfinished_requests():
            return -1.0  # traffic: the plugin callbacks of each step do the work
        used = 0.0
        for job in self.running():
            used += self.work(job, engine.config.max_num_batched_tokens, idle=True)
            job.scheduler.share = min(1.0, job.scheduler.share + job.scheduler.cfg.additive_step)
            self.metrics.finetune_tokens.observe(used)
        return used

    def _poll_peers(self) -> None:
        """Offers the feedback that the pool's other workers accepted since the last poll to this worker's jobs
        (at most every PEER_POLL_S; samples for adapters without a job here are someone else's to train)."""
        now = time.monotonic()
        if self.peers is None or now - self._peers_polled < PEER_POLL_S:
            return
        self._peers_polled = now
        try:
            samples = self.peers.poll()
        except OSError:
            log.exception("cannot read the pool's feedback logs")
            return
        for s in samples:
            self._on_feedback(s)

    def _idle_driver(self) -> None:
        while not self._stop.is_set():
            self._poll_peers()
            if not self.running():
                self._work.wait(0.2)
                self._work.clear()
                continue
            try:
                used = self.runner.call_threadsafe(self._idle_slice).result()
            except Exception:  # noqa: BLE001 - engine dead or stopping
                if not self.runner.alive:
                    return
                log.exception("training slice failed")
                used = 0.0
            if used == 0.0 and any(j.busy for j in list(self.jobs.values())):
                time.sleep(0.001)  # launched graphs still running: collect their results soon, keep the GPU fed
            elif used == 0.0:
                self._work.wait(0.05)
                self._work.clear()
            elif used < 0:
                time.sleep(0.002)

    # ---- status ----
    def job_status(self, name: str) -> dict | None:
        with self._lock:
            job = self.jobs.get(name)
        return None if job is None else job.status()

    def list_status(self) -> list[dict]:
        with self._lock:
            jobs = list(self.jobs.values())
        return [j.status() for j in jobs]

    def describe(self) -> dict:
        return {
            "dataDir": str(self.data_dir),
            "checkpointDir": str(self.checkpoint_dir),
            "versionsRoot": str(self.versions_root),
            "feedback": len(self.feedback or []),
            "peerFeedbackLogs": len(self.peers.logs()) if self.peers is not None else 0,
            "peerFeedbackBadLines": self.peers.bad_lines if self.peers is not None else 0,
        }


def register(runner, registry=None, data_dir: str | Path | None = None) -> TrainingService:
    """The worker's training service, registered as its runner's engine plugin (call before `runner.start()` so
    it sees every request)."""
    svc = TrainingService(runner, registry, data_dir)
    runner.add_plugin(svc)
    return svc
