"""The one seam between the serving loop and work that rides it (co-serving fine-tuning): `IterationPlugin`.

Why one typed interface owned by the engine: the engine knows *when* in a step other work may run without hurting
serving, and nothing about what that work is. A plugin is registered once (`AsyncEngineRunner.add_plugin`, from
`worker/main.py`), attached in the engine thread when the engine is built, and called back at four points:

- `on_prefill(batch, inputs)`: a step with prefill tokens has been queued; the plugin may return a `PrefillRecord`
  that reads what the step wrote into the paged KV cache (activation recording). It never changes the forward,
  so the step stays a replayable CUDA graph.
- `after_launch(info)`: a step's kernels are queued and the host has not yet waited for its tokens; asynchronous
  work queued here (CUDA-graph training pieces) runs on the GPU while the host settles the step.
- `after_step(info)`: the step is settled; synchronous work (eager training pieces) runs here, off the step's
  critical path, within `info.leftover_tokens` of the iteration's token budget.
- `on_finish(request)`: a request finished or was aborted (the feedback API resolves feedback against these).

Every callback runs in the engine thread, so a plugin touches the model, the adapter store and the KV cache
without locks. A callback that raises is logged and skipped: serving goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from lorafleet.worker.engine.llm_engine import LLMEngine
    from lorafleet.worker.engine.model_runner import StepInputs
    from lorafleet.worker.engine.scheduler import ScheduledBatch

# called with the runner's per-layer (k_cache, v_cache) and the step's slot mapping, after the forward is queued
PrefillRecord = Callable[[list[tuple["torch.Tensor", "torch.Tensor"]], "torch.Tensor"], None]


@dataclass
class IterationInfo:
    """One serving step as a plugin sees it."""

    step: int
    num_scheduled_tokens: int
    leftover_tokens: int  # max_num_batched_tokens - tokens scheduled this step
    num_prefill_tokens: int
    num_decode_tokens: int
    num_seqs: int
    step_seconds: float
    forward_seconds: float
    kv_usage: float


@dataclass
class FinishedRequest:
    """What a finished (or aborted) request looked like."""

    request_id: str
    lora_name: str | None
    lora_version: str | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str
    finish_reason: str | None
    arrival_time: float
    finish_time: float
    extra: dict[str, Any] = field(default_factory=dict)


class IterationPlugin(Protocol):
    """Work that runs inside the serving loop; see the module docstring for when each callback runs. A plugin may
    subclass this protocol to inherit do-nothing defaults for the callbacks it does not need."""

    def attach(self, engine: LLMEngine) -> None:
        """Called once in the engine thread, when the plugin joins a built engine."""

    def on_prefill(self, batch: ScheduledBatch, inputs: StepInputs) -> PrefillRecord | None:
        """A step with prefill tokens is queued: what to read from the KV cache it writes, or None."""

    def after_launch(self, info: IterationInfo) -> None:
        """A step's kernels are queued; its tokens are not yet on the host."""

    def after_step(self, info: IterationInfo) -> None:
        """A step is settled."""

    def on_finish(self, request: FinishedRequest) -> None:
        """A request finished or was aborted."""
