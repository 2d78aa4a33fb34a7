"""Wire schemas of the training API (camelCase, unknown fields rejected) and their conversion to `JobSpec`.

Why strict: a typo in a job spec (`replayRaito`) must be a 422, not a silently ignored knob; the same models parse
persisted job specs when a worker restarts, so what resumes is exactly what was accepted. Why tables: each API field
is one row (camelCase name -> JobSpec attribute, type, default and bounds), which both builds the wire model and
converts it (`to_spec`), so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lorafleet.worker.feedback.store import TRAINABLE_KINDS
from lorafleet.worker.names import adapter_name, job_name
from lorafleet.worker.training.graphed import check_placement
from lorafleet.worker.training.trainer import OptimConfig
from lorafleet.worker.training.versions import ATTN_PROJS, MLP_PROJS, PublishPolicy
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo


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
    placement: str = "serving"  # where graphed micro-batches run (graphed.PLACEMENTS)
    serving_sms: int = 16  # SMs left to serving alone with the partition placement


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# (JobSpec attribute, dotted for a nested config's (`optim.lr`), or a section's own table; type; default and bounds)
Row = tuple[object, object, FieldInfo]


def _fields(name: str, table: dict[str, Row], **kw) -> type[BaseModel]:
    """The strict wire model of a table (`name` is its name in the JSON schema)."""
    return create_model(name, __base__=_Strict, **kw, **{k: (t, f) for k, (_, t, f) in table.items()})  # type: ignore


def _section(name: str, table: dict[str, Row], **kw) -> Row:
    """A nested object of the API, every field with a default."""
    model = _fields(name, table, **kw)
    return (table, model, Field(default_factory=model))


def _flatten(m: BaseModel, table: dict[str, Row], out: dict[str, dict]) -> dict[str, dict]:
    """A model's values by JobSpec attribute: {"": JobSpec's own, "optim": OptimConfig's, "publish": PublishPolicy's}."""
    for api, (attr, _, _) in table.items():
        v = getattr(m, api)
        if isinstance(attr, dict):
            _flatten(v, attr, out)
        else:
            group, _, key = str(attr).rpartition(".")
            out.setdefault(group, {})[key] = list(v) if isinstance(v, list) else v
    return out


def _targets(cls, v: list[str]) -> list[str]:
    bad = [t for t in v if t not in ATTN_PROJS + MLP_PROJS]
    if bad:
        raise ValueError(f"unknown LoRA targets {bad}; allowed: {list(ATTN_PROJS + MLP_PROJS)}")
    return sorted(set(v))


def _gate_has_heldout(self: BaseModel) -> BaseModel:
    if self.onHeldoutImprovement and self.heldoutFraction == 0:  # type: ignore[attr-defined]
        raise ValueError("onHeldoutImprovement needs heldoutFraction > 0: the gate compares held-out losses")
    return self


# placements that are not offered, and why: a job asking for one is refused (422) with this reason, not run as
# something else (docs/coserving.md has the measurements)
NOT_OFFERED = {
    "beside": "a low-priority stream slowed serving kernels past the latency target",
    "fused": "training rows riding serving steps retained at most what `serving` did on every measured shape",
}


def _placement(cls, v: str) -> str:
    if v in NOT_OFFERED:
        raise ValueError(f"placement {v!r} is not offered ({NOT_OFFERED[v]}); use 'serving' or 'partition'")
    return check_placement(v)


KINDS = Literal["accept", "correction", "pair", "reward"]
JOB: dict[str, Row] = {
    "name": ("name", str, Field()),
    "adapter": ("adapter", str, Field(min_length=1, max_length=253)),
    "mode": ("mode", Literal["coserve", "standalone"], Field("coserve")),
    "feedback": _section("FeedbackSpec", {
        "kinds": ("kinds", list[KINDS], Field(default_factory=lambda: list(TRAINABLE_KINDS))),
        "minReward": ("min_reward", float, Field(0.0, ge=-1.0, le=1.0)),
        "sinceSeq": ("since_seq", int, Field(0, ge=0)),
        "epochs": ("epochs", int, Field(3, ge=1, le=100)),
    }),
    "optimizer": _section("OptimizerSpec", {
        "lr": ("optim.lr", float, Field(2e-4, gt=0, le=1.0)),
        "weightDecay": ("optim.weight_decay", float, Field(0.0, ge=0, le=1.0)),
        "betas": ("optim.betas", tuple[float, float], Field((0.9, 0.999))),
        "eps": ("optim.eps", float, Field(1e-8, gt=0)),
        "gradAccumulation": ("optim.grad_accumulation", int, Field(4, ge=1, le=1024)),
        # also at most half the worker's maxNumBatchedTokens
        "microBatchTokens": ("graph_tokens", int, Field(1024, ge=16, le=8192)),
        "maxGradNorm": ("optim.max_grad_norm", float | None, Field(1.0, gt=0)),
        "maxSteps": ("max_steps", int | None, Field(None, ge=1)),
    }),
    "lora": _section("LoraSpec", {
        "rank": ("rank", int, Field(8, ge=1, le=256)),
        "alpha": ("alpha", float, Field(16.0, gt=0)),
        "targets": ("targets", list[str], Field(default_factory=lambda: list(ATTN_PROJS), min_length=1)),
        "useRslora": ("use_rslora", bool, Field(False)),
    }, __validators__={"_targets": field_validator("targets")(_targets)}),
    "publish": _section("PublishSpec", {
        "everySteps": ("publish.every_steps", int, Field(20, ge=1)),
        "onHeldoutImprovement": ("publish.on_heldout_improvement", bool, Field(False)),
        "heldoutFraction": ("heldout_fraction", float, Field(0.1, ge=0.0, le=0.5)),
        "maxLossSpike": ("publish.max_loss_spike", float, Field(2.0, gt=1.0)),
        # with onHeldoutImprovement: relative, over the serving version
        "minImprovement": ("publish.min_improvement", float, Field(0.0, ge=0.0, lt=1.0)),
    }, __validators__={"_gate_has_heldout": model_validator(mode="after")(_gate_has_heldout)}),
    "checkpoint": _section("CheckpointSpec", {  # plus one with every published version and one at maxSteps
        "everySteps": ("checkpoint_every", int, Field(10, ge=1)),
        "keep": ("checkpoint_keep", int, Field(3, ge=1, le=100)),
    }),
    "replayRatio": ("replay_ratio", float, Field(0.25, ge=0.0, le=0.9)),
    "maxActivationStaleness": ("max_staleness", int, Field(4, ge=0)),
    "stalePolicy": ("stale_policy", Literal["recompute", "drop"], Field("recompute")),
    "latencyTarget": _section("LatencyTarget", {  # the percentile: of per-request TPOT (slo.py steers by it)
        "tpotMs": ("tpot_ms", float, Field(50.0, gt=0)),
        "percentile": ("tpot_percentile", float, Field(99.0, ge=50.0, le=100.0)),
    }),
    "minFinetuneShare": ("min_share", float, Field(0.05, ge=0.0, le=1.0)),
    # off by default: training against stashed prompt K/V drops the gradient through the prompt positions, which
    # costs held-out quality (bench/results/cl_task.json: reuse on 0.50 vs off 0.725 exact match); opt in for speed
    "recordActivations": ("record_activations", bool, Field(False)),
    "stashBytes": ("stash_bytes", int, Field(256 << 20, ge=0)),
    "coServing": _section("CoServingSpec", {
        "placement": ("placement", str, Field("serving")),
        "servingSMs": ("serving_sms", int, Field(16, ge=1, le=1024)),
    }, __validators__={"_placement": field_validator("placement")(_placement)}, __doc__=(
        "Where co-served fine-tuning runs on a GPU: `serving` (between serving steps on the serving stream) or the\n"
        "experimental `partition` (a low-priority stream on an SM partition that leaves `servingSMs` to serving)."
    )),
}  # fmt: skip


class JobRequest(_fields("JobFields", JOB)):  # type: ignore[misc]
    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return job_name(v)  # lorafleet.worker.names: the one validator, also for the adapter

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, v: str) -> str:
        return adapter_name(v)

    def to_spec(self) -> JobSpec:
        f = _flatten(self, JOB, {})
        return JobSpec(**f[""], optim=OptimConfig(**f["optim"]), publish=PublishPolicy(**f["publish"]))
