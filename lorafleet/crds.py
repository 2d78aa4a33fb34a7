"""Python description of the LoRA Fleet custom resources (group lorafleet.io, version v1alpha1).

The YAML in `crds/` is what the API server enforces; these pydantic models are what the operator and the CLI read
and write. tests/foundation/test_crd_models.py proves that both describe the same fields, types, required-ness,
enums, bounds and defaults, so neither can drift. Python attributes are snake_case; (de)serialise with aliases:
`BaseModelSpec.model_validate(obj["spec"])`, `status.model_dump(by_alias=True, exclude_none=True)`.
The CEL rules of the CRDs (field combinations) are mirrored by `model_validator`s with the same messages; only
metadata.name length and immutability (transition rules) are left to the API server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel as _Pydantic
from pydantic import ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "lorafleet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "lorafleet"
KINDS = ("BaseModel", "LoRAAdapter", "ContinualLearningJob")
PLURALS = {"BaseModel": "basemodels", "LoRAAdapter": "loraadapters", "ContinualLearningJob": "continuallearningjobs"}
SINGULARS = {kind: plural[:-1] for kind, plural in PLURALS.items()}
SHORT_NAMES = {"BaseModel": ["bm"], "LoRAAdapter": ["lora", "la"], "ContinualLearningJob": ["clj"]}
CRD_DIR = Path(__file__).resolve().parents[1] / "crds"
CRD_FILES = {kind: CRD_DIR / f"{GROUP}_{plural}.yaml" for kind, plural in PLURALS.items()}

ADAPTER_PHASES = ("Pending", "Placed", "Ready", "Failed", "Deleting")
JOB_PHASES = ("Pending", "Running", "Paused", "Succeeded", "Failed")
MAX_REPLICAS = 1024
MAX_PLACEMENTS = 256
MAX_PUBLISHED_VERSIONS = 32
MAX_CONDITIONS = 16
# The scheme set every source URI must use: an absolute path, file:///..., s3://bucket/key, hf://org/repo[@rev]
# or pvc://<claim>/<path>. The CRDs enforce the same rule in CEL.
SOURCE_URI_PATTERN = (
    "^(/[^ ]*|file:///[^ ]*|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^ ]*)?"
    "|hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?"
    "|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/[^ ]+)$"
)
DNS_SUBDOMAIN = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

Name = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
SourceUri = Annotated[str, Field(min_length=1, max_length=2048, pattern=SOURCE_URI_PATTERN)]
ShortText = Annotated[str, Field(max_length=256)]


class _Model(_Pydantic):
    """camelCase on the wire, snake_case in Python; unknown fields are ignored (the API server prunes them anyway)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(_Model):
    """metav1.Condition, as the operator writes it (`Ready`, `Placed`, `Degraded`, ...)."""

    type: Annotated[str, Field(min_length=1, max_length=316)]
    status: Literal["True", "False", "Unknown"]
    reason: Annotated[str, Field(max_length=1024)] | None = None
    message: Annotated[str, Field(max_length=32768)] | None = None
    last_transition_time: str | None = None
    observed_generation: Annotated[int, Field(ge=0)] | None = None


Conditions = Annotated[list[Condition], Field(max_length=MAX_CONDITIONS)]


# ---- BaseModel -----------------------------------------------------------------------------------------------
class ModelSource(_Model):
    uri: SourceUri
    format: Literal["hf", "gguf"] = "hf"


class Toleration(_Model):
    key: ShortText | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: ShortText | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


ClaimName = Annotated[str, Field(min_length=1, max_length=253, pattern="^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
KubeName = Annotated[str, Field(max_length=253)]


class AdapterStore(_Model):
    """Where published continual-learning versions live: a ReadWriteMany claim, or (opt-in) a node directory."""

    claim_name: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    host_path: Annotated[str, Field(min_length=1, max_length=1024)] | None = None


class LocalObjectReference(_Model):
    name: Annotated[str, Field(min_length=1, max_length=253)]


class PodTemplate(_Model):
    """Pod and container fields merged into every worker pod (core/v1 shapes are passed through)."""

    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    service_account_name: KubeName | None = None
    automount_service_account_token: bool | None = None
    priority_class_name: KubeName | None = None
    runtime_class_name: KubeName | None = None
    image_pull_secrets: Annotated[list[LocalObjectReference], Field(max_length=16)] | None = None
    node_selector: dict[str, str] | None = None
    security_context: dict[str, Any] | None = None
    container_security_context: dict[str, Any] | None = None
    affinity: dict[str, Any] | None = None
    tolerations: Annotated[list[dict[str, Any]], Field(max_length=64)] | None = None
    topology_spread_constraints: Annotated[list[dict[str, Any]], Field(max_length=16)] | None = None
    volumes: Annotated[list[dict[str, Any]], Field(max_length=64)] | None = None
    volume_mounts: Annotated[list[dict[str, Any]], Field(max_length=64)] | None = None
    env: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None


class WorkerTemplate(_Model):
    """The essentials of the worker pod; the operator fills in everything else."""

    image: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    resources: dict[str, Any] | None = None  # a core/v1 ResourceRequirements, e.g. limits: {nvidia.com/gpu: 1}
    node_selector: dict[str, str] | None = None
    tolerations: Annotated[list[Toleration], Field(max_length=64)] | None = None
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    claims: Annotated[list[ClaimName], Field(max_length=32)] | None = None
    adapter_store: AdapterStore | None = None
    pod_template: PodTemplate | None = None


class EngineLimits(_Model):
    max_adapters: Annotated[int, Field(ge=1, le=4096)] = 8  # GPU-resident adapter slots per worker
    max_cpu_adapters: Annotated[int, Field(ge=1, le=100000)] | None = None  # host-memory adapter cache
    max_rank: Annotated[int, Field(ge=1, le=1024)] = 64
    adapter_memory_bytes: Annotated[int, Field(ge=1)] | None = None  # adapter-weight budget per worker (placement)
    kv_cache_fraction: Annotated[float, Field(gt=0, le=1)] = 0.9
    max_batched_tokens: Annotated[int, Field(ge=1, le=1048576)] = 8192
    finetune_token_budget: Annotated[int, Field(ge=0, le=1048576)] = 0  # co-serving fine-tuning tokens/iteration

    @model_validator(mode="after")
    def _consistent(self) -> EngineLimits:  # mirrors the CEL rules on spec.limits
        if self.max_cpu_adapters is not None and self.max_cpu_adapters < self.max_adapters:
            raise ValueError("spec.limits.maxCpuAdapters must be >= spec.limits.maxAdapters")
        if self.finetune_token_budget > self.max_batched_tokens:
            raise ValueError("spec.limits.finetuneTokenBudget must not exceed spec.limits.maxBatchedTokens")
        return self


class Execution(_Model):
    cuda_graphs: Literal["all", "decode", "none"] = "all"
    async_scheduling: bool | None = None  # None: the worker decides (on for a GPU)


class BaseModelSpec(_Model):
    source: ModelSource
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    engine: Literal["lorafleet", "vllm"] = "lorafleet"
    execution: Execution | None = None
    replicas: Annotated[int, Field(ge=0, le=MAX_REPLICAS)] = 1
    worker: WorkerTemplate = Field(default_factory=WorkerTemplate)
    limits: EngineLimits = Field(default_factory=EngineLimits)

    @model_validator(mode="after")
    def _consistent(self) -> BaseModelSpec:
        if self.engine == "vllm" and self.source.format == "gguf":
            raise ValueError("spec.source.format gguf is only supported with spec.engine lorafleet")
        ex = self.execution
        if self.engine == "vllm" and ex is not None and (ex.cuda_graphs == "decode" or ex.async_scheduling):
            raise ValueError(
                "spec.execution cudaGraphs decode and asyncScheduling are only supported with spec.engine lorafleet"
            )
        return self


class WorkerStatus(_Model):
    pod: Annotated[str, Field(min_length=1, max_length=253)]
    node: Annotated[str, Field(max_length=253)] | None = None
    ready: bool = False
    adapter_slots: Annotated[int, Field(ge=0)] | None = None
    slots_used: Annotated[int, Field(ge=0)] | None = None
    load: Annotated[float, Field(ge=0)] | None = None


class BaseModelStatus(_Model):
    ready_workers: Annotated[int, Field(ge=0)] | None = None
    workers: Annotated[list[WorkerStatus], Field(max_length=MAX_REPLICAS)] | None = None
    conditions: Conditions | None = None
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    message: Annotated[str, Field(max_length=1024)] | None = None
    kopf: dict[str, Any] | None = None  # kopf's own bookkeeping (status.kopf.progress); preserved as-is


# ---- LoRAAdapter ---------------------------------------------------------------------------------------------
class AdapterSource(_Model):
    uri: SourceUri


class AdapterReplicas(_Model):
    """`auto: false` keeps `min` replicas; `auto: true` scales between `min` and `max` with measured load."""

    min: Annotated[int, Field(ge=1, le=MAX_REPLICAS)] = 1
    max: Annotated[int, Field(ge=1, le=MAX_REPLICAS)] | None = None
    auto: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> AdapterReplicas:
        if self.max is not None and self.min > self.max:
            raise ValueError("spec.replicas.min must be <= spec.replicas.max")
        if self.auto and self.max is None:
            raise ValueError("spec.replicas.max is required when spec.replicas.auto is true")
        return self


class LoRAAdapterSpec(_Model):
    base_model: Name
    source: AdapterSource
    rank: Annotated[int, Field(ge=1, le=1024)] | None = None
    replicas: AdapterReplicas = Field(default_factory=AdapterReplicas)
    priority: Annotated[int, Field(ge=-1000, le=1000)] = 0
    version: Annotated[str, Field(min_length=1, max_length=63)] | None = None


class Placement(_Model):
    pod: Annotated[str, Field(min_length=1, max_length=253)]
    node: Annotated[str, Field(max_length=253)] | None = None
    since: str | None = None
    ready: bool = False


class LoRAAdapterStatus(_Model):
    phase: Literal["Pending", "Placed", "Ready", "Failed", "Deleting"] | None = None
    version: Annotated[str, Field(max_length=63)] | None = None
    placements: Annotated[list[Placement], Field(max_length=MAX_PLACEMENTS)] | None = None
    request_rate: Annotated[float, Field(ge=0)] | None = None  # requests/s over the last measurement window
    conditions: Conditions | None = None
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    message: Annotated[str, Field(max_length=1024)] | None = None
    kopf: dict[str, Any] | None = None


# ---- ContinualLearningJob ------------------------------------------------------------------------------------
class FeedbackSelector(_Model):
    """Which feedback becomes training data: accepted completions, corrected completions, and a reward floor."""

    accept: bool = True
    corrections: bool = True
    min_reward: float | None = None

    @model_validator(mode="after")
    def _consistent(self) -> FeedbackSelector:
        if not (self.accept or self.corrections):
            raise ValueError("spec.feedback must enable accept or corrections")
        return self


class OptimizerSpec(_Model):
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 0.0001
    betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)] | None = None
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 8
    grad_accumulation: Annotated[int, Field(ge=1, le=1024)] = 1
    max_steps: Annotated[int, Field(ge=1)] | None = None


class LoRAHyperparameters(_Model):
    rank: Annotated[int, Field(ge=1, le=1024)] = 16
    alpha: Annotated[float, Field(gt=0)] = 32.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: (
        Annotated[list[Annotated[str, Field(min_length=1, max_length=128)]], Field(max_length=32)] | None
    ) = None


class PublishPolicy(_Model):
    every_steps: Annotated[int, Field(ge=1)] = 100
    on_heldout_improvement: bool = False
    min_improvement: Annotated[float, Field(ge=0, lt=1)] = 0.0


class CheckpointPolicy(_Model):
    every_steps: Annotated[int, Field(ge=1)] = 10
    keep: Annotated[int, Field(ge=1, le=100)] = 3


class LatencyTarget(_Model):
    tpot_millis: Annotated[float, Field(gt=0)]
    percentile: Annotated[float, Field(ge=50, le=100)] = 99


class CoServing(_Model):
    placement: Literal["serving", "partition"] = "serving"  # beside / fused: refused by the CRD's CEL rule
    serving_sms: Annotated[int, Field(ge=1, le=1024, alias="servingSMs")] = 16


class ContinualLearningJobSpec(_Model):
    adapter: Name
    mode: Annotated[Literal["colocated"], Field(json_schema_extra={"enum": ["colocated"]})] = "colocated"
    feedback: FeedbackSelector = Field(default_factory=FeedbackSelector)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    lora: LoRAHyperparameters = Field(default_factory=LoRAHyperparameters)
    publish: PublishPolicy = Field(default_factory=PublishPolicy)
    checkpoint: CheckpointPolicy = Field(default_factory=CheckpointPolicy)
    replay_ratio: Annotated[float, Field(ge=0, le=0.9)] = 0.1  # the worker refuses more: feedback must be trained on
    max_activation_staleness: Annotated[int, Field(ge=0)] = 4  # in optimizer steps
    stale_policy: Literal["recompute", "drop"] = "recompute"
    latency_target: LatencyTarget | None = None
    min_finetune_share: Annotated[float, Field(ge=0, le=1)] = 0.05
    co_serving: CoServing | None = None


class PublishedVersion(_Model):
    version: Annotated[str, Field(min_length=1, max_length=63)]
    step: Annotated[int, Field(ge=0)] | None = None
    published_at: str | None = None
    heldout_loss: float | None = None


class RefusedVersion(_Model):
    step: Annotated[int, Field(ge=0)]
    reason: Annotated[str, Field(max_length=256)]
    heldout_loss: float | None = None
    serving_heldout_loss: float | None = None


class ContinualLearningJobStatus(_Model):
    phase: Literal["Pending", "Running", "Paused", "Succeeded", "Failed"] | None = None
    steps: Annotated[int, Field(ge=0)] | None = None
    tokens_trained: Annotated[int, Field(ge=0)] | None = None
    loss: float | None = None
    finetune_share: Annotated[float, Field(ge=0, le=1)] | None = None
    tpot_ratio: Annotated[float, Field(ge=0)] | None = None
    co_serving: Annotated[str, Field(max_length=32)] | None = None
    published_versions: Annotated[list[PublishedVersion], Field(max_length=MAX_PUBLISHED_VERSIONS)] | None = None
    refused_versions: Annotated[list[RefusedVersion], Field(max_length=8)] | None = None
    conditions: Conditions | None = None
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    kopf: dict[str, Any] | None = None


SPEC_MODELS: dict[str, type[_Model]] = {
    "BaseModel": BaseModelSpec,
    "LoRAAdapter": LoRAAdapterSpec,
    "ContinualLearningJob": ContinualLearningJobSpec,
}
STATUS_MODELS: dict[str, type[_Model]] = {
    "BaseModel": BaseModelStatus,
    "LoRAAdapter": LoRAAdapterStatus,
    "ContinualLearningJob": ContinualLearningJobStatus,
}
