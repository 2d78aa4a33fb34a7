"""A job's durable side: where it starts from, its checkpoints, and the adapter versions it publishes.

Start: the newest good checkpoint (checkpoint.py: the whole training state) beats the newest version (weights
only), which beats a fresh LoRA, so a resumed run is the uninterrupted run (docs/training-api.md, Restarts).

After every optimizer step (`after_step`): publish when due (and always at the last step, so the final weights are
a version), checkpoint with every published version, at the last step and every `checkpointEvery` steps. A
candidate that fails the publisher's checks (NaN, loss spike, held-out gate) is refused and, unless it only failed
to improve, rolled back to the last good weights. A version is a PEFT directory written atomically and loaded into
the engine's adapter store between two iterations (`publish_version`). For an adapter from a store every replica
reads (`s3://`, a writable `pvc://` claim) the version is also uploaded there in the background
(`sources.publish.VersionSink`), and the status names its store URI only once it is whole (docs/stores.md).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from lorafleet.worker.training.checkpoint import Checkpoint, CheckpointStore, optimizer_tensors, restore_optimizer
from lorafleet.worker.training.lora_context import TrainableLoRA
from lorafleet.worker.training.spec import JobSpec
from lorafleet.worker.training.trainer import TrainSample
from lorafleet.worker.training.versions import VersionPublisher, save_peft_adapter

if TYPE_CHECKING:
    from lorafleet.worker.training.job import ContinualLearningJob

log = logging.getLogger(__name__)


def published_versions(root: Path) -> list[tuple[int, Path]]:
    """The complete versions (`v<n>` with weights) under an adapter's versions directory, oldest first."""
    return sorted(
        (int(p.name[1:]), p)
        for p in root.glob("v*")
        if p.name[1:].isdigit() and (p / "adapter_model.safetensors").exists()
    )


def is_last(step: int, max_steps: int | None) -> bool:
    return max_steps is not None and step >= max_steps


def lora_from_checkpoint(c: Checkpoint, shape, device) -> TrainableLoRA:
    """The LoRA a checkpoint describes; ValueError when its tensors do not fit (the checkpoint counts as corrupt)."""
    if c.state.get("step") != c.step or not isinstance(c.state.get("replay"), dict):
        raise ValueError("checkpoint state is incomplete")
    meta = c.state.get("lora") or {}
    try:
        lora = TrainableLoRA(
            shape, int(meta["rank"]), float(meta["alpha"]), list(meta["targets"]), bool(meta["useRslora"]), device
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"checkpoint has no usable LoRA description: {exc!r}") from exc
    want = dict(lora.named_parameters())
    if not want:
        raise ValueError("checkpoint LoRA has no parameters")
    try:  # strict: every parameter, none more, each of its shape
        lora.load_state_dict({k[len("lora.") :]: v for k, v in c.tensors.items() if k.startswith("lora.")})
    except RuntimeError as exc:
        raise ValueError(f"checkpoint LoRA tensors do not match its description: {' '.join(str(exc).split())}") from exc
    for k, v in c.tensors.items():
        if k.startswith("opt.") and k.endswith((".exp_avg", ".exp_avg_sq")):
            name = k[len("opt.") :].rsplit(".", 1)[0]
            if name not in want or v.shape != want[name].shape:
                raise ValueError(f"checkpoint optimizer tensor {k} does not fit the LoRA")
    return lora


class Lifecycle:
    """Versions and checkpoints of one job (engine thread)."""

    def __init__(self, spec: JobSpec, engine, versions_root: Path, state_dir: Path | None, metrics, sink=None) -> None:
        self.spec = spec
        self.engine = engine
        self.metrics = metrics
        self.versions_root = Path(versions_root) / spec.adapter
        self.versions_root.mkdir(parents=True, exist_ok=True)
        self.checkpoints = CheckpointStore(Path(state_dir) / spec.adapter, spec.checkpoint_keep) if state_dir else None
        self.info: dict = {"everySteps": spec.checkpoint_every, "lastStep": None, "restoredStep": None, "corrupt": []}
        self.publisher = VersionPublisher(spec.publish)
        self.version_steps: dict[str, int] = {}
        self.current_version: str | None = None
        self.heldout_loss: float | None = None
        self.last_checkpoint = 0
        self.good: dict = {}  # the weights and optimizer state of the serving version (rollback target)
        self._next = 1 + max([int(p.name[1:]) for p in self.versions_root.glob("v*") if p.name[1:].isdigit()] or [0])
        self.sink = sink  # a sources.publish.VersionSink: versions of an adapter from a store go to that store
        self.store = None  # its AdapterPublisher for this adapter (bound in `start`, once the source is known)

    # ---- start ----
    def start(self, shape, device) -> tuple[TrainableLoRA, Checkpoint | None, bool]:
        """(the LoRA to train, the checkpoint to resume from, whether a first version must be published)."""
        spec = self.spec
        try:
            current = self.engine.store.current(spec.adapter)
        except KeyError:
            current = None
        if current is None:  # a restarted worker: continue from the newest version this job published
            done = published_versions(self.versions_root)
            if done:
                n, path = done[-1]
                current = self.engine.load_adapter(spec.adapter, str(path), f"v{n}")
        if self.sink is not None:
            self.store = self.sink.bind(spec.adapter, current.uri if current else None, self.versions_root)
            if self.store is not None:  # number past what other replicas published to the store meanwhile
                self._next = max(self._next, 1 + self.store.newest())
        ckpt, lora = None, None
        if self.checkpoints is not None:
            built: dict[str, TrainableLoRA] = {}
            res = self.checkpoints.load_latest(lambda c: built.update(lora=lora_from_checkpoint(c, shape, device)))
            ckpt, lora = res.checkpoint, built.get("lora")
            for bad in res.corrupt:
                self.metrics.checkpoints.labels(spec.adapter, "corrupt").inc()
                self.checkpoints.discard(Path(bad["path"]))
                log.warning("job %s: corrupt checkpoint %s: %s", spec.name, bad["path"], bad["reason"])
            self.info["corrupt"] = res.corrupt
        if lora is None and current is not None:
            lora = TrainableLoRA.from_peft(shape, current.path, device=device)
        elif lora is None:
            lora = TrainableLoRA(
                shape, spec.rank, spec.alpha, list(spec.targets), spec.use_rslora, device=device, seed=spec.seed
            )
        if current is not None:
            self.current_version = current.version
            self.version_steps[current.version] = 0
        return lora, ckpt, current is None

    def corrupt_note(self) -> str:
        return ", ".join(f"step {b['step']} ({b['reason']})" for b in self.info["corrupt"])

    # ---- after an optimizer step ----
    def after_step(self, job: ContinualLearningJob) -> bool:
        """Publishes and checkpoints as due; True when this was the job's last step."""
        step, sp = job.trainer.step, self.spec
        last = is_last(step, sp.max_steps)
        if self.publisher.due(step) or (last and self.serving_step() != step):
            self.publish(job)
        if self.serving_step() == step or last or step - self.last_checkpoint >= sp.checkpoint_every:
            self.checkpoint(job)
        return last

    def barrier(self, step: int) -> bool:
        """Whether step `step` may publish or checkpoint (the asynchronous executor drains before it goes on)."""
        sp = self.spec
        return (
            is_last(step, sp.max_steps)
            or self.publisher.due(step)
            or step - self.last_checkpoint >= sp.checkpoint_every
        )

    def serving_step(self) -> int:
        return self.version_steps.get(self.current_version or "", -1)

    # ---- checkpoints ----
    def checkpoint(self, job: ContinualLearningJob) -> None:
        """Writes the job's full training state at this step boundary (no group in flight)."""
        if self.checkpoints is None:
            return
        step = job.trainer.step
        try:
            self.checkpoints.save(step, self._tensors(job), self._scalars(job))
        except OSError as exc:  # a full disk must not stop training; the previous checkpoint stays good
            self.metrics.checkpoints.labels(self.spec.adapter, "failed").inc()
            log.warning("job %s: checkpoint at step %d not written: %s", self.spec.name, step, exc)
            return
        self.last_checkpoint = step
        self.info["lastStep"] = step
        self.metrics.checkpoints.labels(self.spec.adapter, "written").inc()

    def _tensors(self, job: ContinualLearningJob) -> dict[str, torch.Tensor]:
        names = [n for n, _ in job.lora.named_parameters()]
        out = {f"lora.{n}": p.detach().float().cpu().clone() for n, p in job.lora.named_parameters()}
        out.update({k: v.cpu() for k, v in optimizer_tensors(job.trainer.opt, names).items()})
        out["rng.job"] = job.planner.rng.get_state()
        return out

    def _scalars(self, job: ContinualLearningJob) -> dict:
        lora = job.lora
        return {
            "job": self.spec.name,
            "adapter": self.spec.adapter,
            "step": job.trainer.step,
            "version": self.current_version,
            "lora": {
                "rank": lora.rank,
                "alpha": lora.alpha,
                "targets": list(lora.targets),
                "useRslora": lora.use_rslora,
            },
            "tokensTrained": job.tokens_trained,
            "sequenceTokens": job.sequence_tokens,
            "counts": {"trained": job.counts["trained"], "replay": job.counts["replay"]},
            "lossEma": job.loss_ema,
            "lastLoss": job.last_loss,
            "heldoutLoss": self.heldout_loss,
            "versionSteps": dict(self.version_steps),
            "data": job.planner.state(),
            "replay": job.replay.state(),
            "controller": {**job.scheduler.state(), "secondsPerUnit": job.graphed.seconds_per_unit},
            "publisher": self.publisher.state(),
        }

    def restore(self, job: ContinualLearningJob, c: Checkpoint) -> str:
        """Puts a checkpoint's state into the job; returns the status message."""
        st = c.state
        restore_optimizer(job.trainer.opt, [n for n, _ in job.lora.named_parameters()], c.tensors)
        job.trainer.step = self.last_checkpoint = int(st["step"])
        if "rng.job" in c.tensors:
            job.planner.rng.set_state(c.tensors["rng.job"].to(torch.uint8))
        job.tokens_trained, job.sequence_tokens = int(st.get("tokensTrained", 0)), int(st.get("sequenceTokens", 0))
        job.counts.update({k: int(v) for k, v in (st.get("counts") or {}).items()})
        job.loss_ema, job.last_loss = st.get("lossEma"), st.get("lastLoss")
        self.heldout_loss = st.get("heldoutLoss")
        self.version_steps.update({str(k): int(v) for k, v in (st.get("versionSteps") or {}).items()})
        job.planner.restore(st.get("data") or {})
        if st.get("replay"):
            job.replay.restore(st["replay"])
        if st.get("publisher"):
            self.publisher.restore(st["publisher"])
        ctl = st.get("controller") or {}
        job.scheduler.restore(ctl)
        if ctl.get("secondsPerUnit"):
            job.graphed.seconds_per_unit = float(ctl["secondsPerUnit"])
        self.info["restoredStep"] = self.info["lastStep"] = job.trainer.step
        self.metrics.checkpoints.labels(self.spec.adapter, "restored").inc()
        msg = f"resumed from checkpoint step {job.trainer.step}"
        if self.info["corrupt"]:
            msg += f"; skipped corrupt checkpoint(s): {self.corrupt_note()}"
        log.info("job %s: %s", self.spec.name, msg)
        return msg

    # ---- versions ----
    def snapshot(self, job: ContinualLearningJob) -> None:
        """The current weights become the rollback target (they serve)."""
        self.good = {
            "lora": {k: v.detach().clone() for k, v in job.lora.state_dict().items()},
            "opt": copy.deepcopy(job.trainer.opt.state_dict()),
        }

    def _rollback(self, job: ContinualLearningJob) -> None:
        job.executor.reset()  # queued work read the refused weights: drop it with its gradients
        job.lora.load_state_dict(self.good["lora"])
        job.trainer.opt.load_state_dict(copy.deepcopy(self.good["opt"]))

    def evaluate_heldout(self, job: ContinualLearningJob) -> float | None:
        held = job.planner.heldout
        if not held:
            return None
        return job.trainer.eval_loss([TrainSample(s.prompt_ids, s.completion_ids) for s in held])

    def serving_heldout(self, job: ContinualLearningJob) -> float | None:
        """The held-out loss of the serving version's weights on the current held-out samples: the held-out gate's
        reference. The live weights are restored afterwards."""
        if not job.planner.heldout:
            return None
        live = {k: v.detach().clone() for k, v in job.lora.state_dict().items()}
        job.lora.load_state_dict(self.good["lora"])
        try:
            return self.evaluate_heldout(job)
        finally:
            job.lora.load_state_dict(live)

    def publish(self, job: ContinualLearningJob, initial: bool = False) -> None:
        """Publishes the current weights as the next version, unless the publisher refuses them (not `initial`)."""
        step = job.trainer.step
        heldout = None if initial else self.evaluate_heldout(job)
        if not initial:
            gate = self.spec.publish.on_heldout_improvement and heldout is not None  # none held out: check refuses
            serving = self.serving_heldout(job) if gate else None
            why = self.publisher.check(job.last_loss, job.lora.finite(), heldout, serving)
            if why is not None:
                self.publisher.refuse(step, why, heldout, serving)
                self.metrics.refused_versions.labels(self.spec.adapter).inc()
                job.message = f"refused candidate at step {step}: {why}"
                log.warning("job %s: %s", self.spec.name, job.message)
                if "improvement" not in why:
                    self._rollback(job)
                return
        self.publish_version(job, step, heldout)
        self.snapshot(job)

    def publish_version(self, job: ContinualLearningJob, step: int, heldout: float | None) -> Path:
        """Writes version v<n> of the live weights and switches serving to it (atomically, between iterations)."""
        n, self._next = self._next, self._next + 1
        lora, version = job.lora, f"v{n}"
        path = save_peft_adapter(
            self.versions_root / version,
            lora.export(),
            lora.rank,
            lora.alpha,
            lora.targets,
            str(self.engine.config.model),
            lora.use_rslora,
            {"job": self.spec.name, "step": step, "loss": job.last_loss, "heldoutLoss": heldout},
        )
        self.engine.load_adapter(self.spec.adapter, str(path), version)
        self.version_steps[version] = step
        self.current_version = version
        self.heldout_loss = heldout
        self.publisher.record(step, n, job.last_loss, heldout, path)
        if self.store is not None:
            self.store.submit(n, path)  # uploads beside serving; the status gives its store URI once it is whole
        self.metrics.published_version.labels(self.spec.adapter).set(n)
        return path

    def version_step(self, version: str | None) -> int:
        return self.version_steps.get(version or "", 0)

    def status(self) -> dict:
        v = self.current_version
        return {
            "currentVersion": int(v[1:]) if v and v[1:].isdigit() else v,
            "publishedVersions": [
                self.store.api(r.to_api()) if self.store else r.to_api() for r in self.publisher.published
            ],
            "refusedVersions": list(self.publisher.refused),
            "checkpoint": dict(self.info),
        }

    def note(self, message: str) -> str:
        """The job's message with the store's upload state (a failing upload names the store)."""
        return self.store.note(message) if self.store is not None else message
