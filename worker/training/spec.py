"""Wire schemas of the training API (camelCase, unknown fields rejected) and their conversion to `JobSpec`.

Why strict: a typo in a job spec (`replayRaito`) must be a 422, not a silently ignored knob; the same models parse
persisted job specs when a worker restarts, so what resumes is exactly what was accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lorafleet.worker.feedback.store import TRAINABLE_KINDS
from lorafleet.worker.names import adapter_name, job_name
from lorafleet.worker.training.streams import PLACEMENTS
from lorafleet.worker.training.trainer import OptimConfig
from lorafleet.worker.training.versions import ATTN_PROJS, MLP_PROJS, PublishPolicy
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


@dataclass
class JobSpec:
    """A validated job (`JobRequest.to_spec`), in the trainer's terms."""

    name: str
    adapter: str
    mode: str = "coserve"  # coserve | standalone
    kinds: list[str] = field(default_factory=lambda: ["accept", "correction", "pair", "reward"])
    min_reward: float = 0.0
    since_seq: int = 0
    epochs: int = 3
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_steps: int | None = None
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    use_rslora: bool = False
    publish: PublishPolicy = field(default_factory=PublishPolicy)
    heldout_fraction: float = 0.1
    replay_ratio: float = 0.25
    max_staleness: int = 4
    stale_policy: str = "recompute"  # recompute | drop
    tpot_ms: float = 50.0
    tpot_percentile: float = 99.0
    min_share: float = 0.05
    record_activations: bool = False  # off by default: the reused prompt state drops the prompt gradient
    stash_bytes: int = 256 << 20
    max_seq_tokens: int = 1024
    seed: int = 0
    checkpoint_every: int = 10  # optimizer steps between checkpoints (also one with every published version)
    checkpoint_keep: int = 3
    graphs: str = "auto"  # auto | on: capture CUDA graphs of the micro-batches on a GPU; off: run them eagerly
    graph_tokens: int = (
        1024  # optimizer.microBatchTokens: tokens per micro-batch (a longer sample loses its prompt's start)
    )
    graph_prefix: int = 4096  # stashed prefix keys per graphed micro-batch
    placement: str = "serving"  # where graphed micro-batches run (streams.PLACEMENTS)
    serving_sms: int = 16  # SMs left to serving alone with the partition placement


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class FeedbackSpec(_Strict):
    kinds: list[Literal["accept", "correction", "pair", "reward"]] = Field(
        default_factory=lambda: list(TRAINABLE_KINDS)
    )
    minReward: float = Field(0.0, ge=-1.0, le=1.0)
    sinceSeq: int = Field(0, ge=0)
    epochs: int = Field(3, ge=1, le=100)


class OptimizerSpec(_Strict):
    lr: float = Field(2e-4, gt=0, le=1.0)
    weightDecay: float = Field(0.0, ge=0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    gradAccumulation: int = Field(4, ge=1, le=1024)
    microBatchTokens: int = Field(1024, ge=16, le=8192)  # also at most half the worker's maxNumBatchedTokens
    maxGradNorm: float | None = Field(1.0, gt=0)
    maxSteps: int | None = Field(None, ge=1)


class LoraSpec(_Strict):
    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    useRslora: bool = False

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t not in ATTN_PROJS + MLP_PROJS]
        if bad:
            raise ValueError(f"unknown LoRA targets {bad}; allowed: {list(ATTN_PROJS + MLP_PROJS)}")
        return sorted(set(v))


class PublishSpec(_Strict):
    everySteps: int = Field(20, ge=1)
    onHeldoutImprovement: bool = False
    heldoutFraction: float = Field(0.1, ge=0.0, le=0.5)
    maxLossSpike: float = Field(2.0, gt=1.0)
    minImprovement: float = Field(0.0, ge=0.0, lt=1.0)  # with onHeldoutImprovement: relative, over the serving one

    @model_validator(mode="after")
    def _gate_has_heldout(self) -> PublishSpec:
        if self.onHeldoutImprovement and self.heldoutFraction == 0:
            raise ValueError("onHeldoutImprovement needs heldoutFraction > 0: the gate compares held-out losses")
        return self


class CheckpointSpec(_Strict):
    everySteps: int = Field(10, ge=1)  # plus one with every published version and one at maxSteps
    keep: int = Field(3, ge=1, le=100)


class LatencyTarget(_Strict):
    tpotMs: float = Field(50.0, gt=0)
    percentile: float = Field(99.0, ge=50.0, le=100.0)  # of per-request TPOT (training/slo.py steers by it)


# placements that are not offered, and why: a job asking for one is refused (422) with this reason, not run as
# something else (docs/coserving.md has the measurements)
NOT_OFFERED = {
    "beside": "a low-priority stream slowed serving kernels past the latency target",
    "fused": "training rows riding serving steps retained at most what `serving` did on every measured shape",
}


class CoServingSpec(_Strict):
    """Where co-served fine-tuning runs on a GPU: `serving` (between serving steps on the serving stream) or the
    experimental `partition` (a low-priority stream on an SM partition that leaves `servingSMs` to serving)."""

    placement: str = "serving"
    servingSMs: int = Field(16, ge=1, le=1024)

    @field_validator("placement")
    @classmethod
    def _placement(cls, v: str) -> str:
        if v in NOT_OFFERED:
            raise ValueError(f"placement {v!r} is not offered ({NOT_OFFERED[v]}); use 'serving' or 'partition'")
        if v not in PLACEMENTS:
            raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {v!r}")
        return v


class JobRequest(_Strict):
    name: str
    adapter: str = Field(min_length=1, max_length=253)
    mode: Literal["coserve", "standalone"] = "coserve"
    feedback: FeedbackSpec = Field(default_factory=FeedbackSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    publish: PublishSpec = Field(default_factory=PublishSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    replayRatio: float = Field(0.25, ge=0.0, le=0.9)
    maxActivationStaleness: int = Field(4, ge=0)
    stalePolicy: Literal["recompute", "drop"] = "recompute"
    latencyTarget: LatencyTarget = Field(default_factory=LatencyTarget)
    minFinetuneShare: float = Field(0.05, ge=0.0, le=1.0)
    # off by default: training against stashed prompt K/V drops the gradient through the prompt positions, which
    # costs held-out quality (bench/results/cl_task.json: reuse on 0.50 vs off 0.725 exact match); opt in for speed
    recordActivations: bool = False
    stashBytes: int = Field(256 << 20, ge=0)
    coServing: CoServingSpec = Field(default_factory=CoServingSpec)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return job_name(v)  # lorafleet.worker.names: the one validator, also for the adapter

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, v: str) -> str:
        return adapter_name(v)

    def to_spec(self) -> JobSpec:
        o = self.optimizer
        return JobSpec(
            name=self.name,
            adapter=self.adapter,
            mode=self.mode,
            kinds=list(self.feedback.kinds),
            min_reward=self.feedback.minReward,
            since_seq=self.feedback.sinceSeq,
            epochs=self.feedback.epochs,
            optim=OptimConfig(
                lr=o.lr,
                weight_decay=o.weightDecay,
                betas=tuple(o.betas),
                eps=o.eps,
                grad_accumulation=o.gradAccumulation,
                max_grad_norm=o.maxGradNorm,
            ),
            max_steps=o.maxSteps,
            graph_tokens=o.microBatchTokens,
            rank=self.lora.rank,
            alpha=self.lora.alpha,
            targets=list(self.lora.targets),
            use_rslora=self.lora.useRslora,
            publish=PublishPolicy(
                every_steps=self.publish.everySteps,
                on_heldout_improvement=self.publish.onHeldoutImprovement,
                max_loss_spike=self.publish.maxLossSpike,
                min_improvement=self.publish.minImprovement,
            ),
            heldout_fraction=self.publish.heldoutFraction,
            replay_ratio=self.replayRatio,
            max_staleness=self.maxActivationStaleness,
            stale_policy=self.stalePolicy,
            tpot_ms=self.latencyTarget.tpotMs,
            tpot_percentile=self.latencyTarget.percentile,
            min_share=self.minFinetuneShare,
            record_activations=self.recordActivations,
            stash_bytes=self.stashBytes,
            checkpoint_every=self.checkpoint.everySteps,
            checkpoint_keep=self.checkpoint.keep,
            placement=self.coServing.placement,
            serving_sms=self.coServing.servingSMs,
        )
