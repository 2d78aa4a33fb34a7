"""Requests as the engine sees them: sampling parameters, per-sequence state, and what a step reports back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import torch
from lorafleet.worker.engine.logprobs import MAX_LOGPROBS, TokenLogprob

if TYPE_CHECKING:
    from lorafleet.worker.engine.detokenizer import IncrementalDetokenizer
    from lorafleet.worker.lora.store import AdapterVersion


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI: logit -= p if the token already appears in the output
    frequency_penalty: float = 0.0  # OpenAI: logit -= f * (times the token appears in the output)
    repetition_penalty: float = 1.0  # HF/CTRL: logits of prompt+output tokens divided (>0) or multiplied (<0) by it
    # False: the caller reads the text of the final output only (a non-streaming API request). Without stop strings
    # the engine then decodes the output once when the request ends, not once per token in every step: ~30% of the
    # engine's host time per running sequence on CPU, which every step of every other request waits for.
    incremental_text: bool = True
    # vLLM's semantics: no stop token can be drawn and no stop string ends the output before this many tokens
    min_tokens: int = 0
    include_stop_str_in_output: bool = False  # the matched stop string stays at the end of the text
    # None: no logprobs; k >= 0: each output token's logprob and the k most likely tokens at its position
    logprobs: int | None = None
    # set by the engine when it admits the request (EOS unless ignored, plus stop_token_ids): what min_tokens masks
    min_tokens_stop_ids: tuple[int, ...] = ()

    @property
    def has_penalties(self) -> bool:
        """Whether the row's logits depend on its previous tokens (penalties, or min_tokens masking): the sampler
        then gets the token history, and async scheduling settles the step before the next one is planned."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
            or self.min_tokens > 0
        )

    def validate(self) -> None:
        """Raises ValueError with an API-friendly message (the HTTP layer turns it into a 400)."""
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative integers")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError("seed must be an integer")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request. `token_ids` = prompt + generated; KV exists for the first `num_computed_tokens` of them."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter: AdapterVersion | None = None,
        generator: torch.Generator | None = None,
        detokenizer: IncrementalDetokenizer | None = None,
    ) -> None:
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.adapter = adapter
        self.generator = generator
        self.detokenizer = detokenizer
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # prefix-cache hashes of the full, computed blocks
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None  # vLLM: the stop token id or stop string that ended it
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.num_preemptions = 0
        self.slot_waits = 0  # scheduler passes that found no free GPU slot for its adapter
        self.enqueued_pass = 0  # scheduler pass at which it (re)entered the waiting queue: its age is measured so
        self.admitted_pass: int | None = None  # scheduler pass of its latest admission
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_remaining(self) -> int:
        """Tokens whose KV still has to be computed before the next sample (1 for a decode)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def lora_name(self) -> str | None:
        return self.adapter.name if self.adapter is not None else None

    @property
    def lora_version(self) -> str | None:
        return self.adapter.version if self.adapter is not None else None

    @property
    def cache_salt(self) -> tuple[str, str] | None:
        """KV depends on the adapter version too: it salts the prefix-cache hashes."""
        return (self.adapter.name, self.adapter.version) if self.adapter else None

    @property
    def slot(self) -> int:
        return self.adapter.slot if self.adapter is not None and self.adapter.slot is not None else -1

    @property
    def text(self) -> str:
        return self.detokenizer.text if self.detokenizer else ""


@dataclass
class RequestOutput:
    """What one step reports for a request. `output_token_ids` is a view computed on access: the engine hands
    over its growing token list plus a length, so a step costs O(1) per request instead of copying every output
    so far (quadratic over a long generation)."""

    request_id: str
    new_token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    lora_name: str | None = None
    lora_version: str | None = None
    all_token_ids: list[int] = field(default_factory=list, repr=False)  # prompt + output; may grow later
    num_output_tokens: int = 0
    stop_reason: int | str | None = None  # the stop token id or stop string that finished it (None: EOS, length)
    all_logprobs: list[TokenLogprob] | None = field(default=None, repr=False)  # per output token; may grow later

    @property
    def output_token_ids(self) -> list[int]:
        start = self.num_prompt_tokens
        return self.all_token_ids[start : start + self.num_output_tokens]

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        """One entry per output token so far (None when the request asked for none)."""
        if self.all_logprobs is None:
            return None
        return self.all_logprobs[: self.num_output_tokens]
