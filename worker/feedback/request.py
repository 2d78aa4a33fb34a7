"""The wire schema of `POST /v1/feedback` (docs/training-api.md): one request about a served request, or a pair.

Why its own schema, strict: feedback is what a client sends most, from outside; a field that does not fit the kind
(`completion` with `accept`, `reward` without `reward`) is a 400 that says so, never a sample trained on something
the client did not mean. Resolving it into a `FeedbackSample` (token ids) needs the tokenizer and the served-request
log, so that happens in the API (`worker/api/training.py`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    kind: Literal["accept", "reject", "correction", "reward", "pair"]
    requestId: str | None = Field(None, min_length=1, max_length=256)
    adapter: str | None = Field(None, min_length=1, max_length=253)
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    completion: str | None = None
    reward: float | None = None

    @model_validator(mode="after")
    def _shape(self) -> FeedbackRequest:
        if self.kind == "pair":
            if self.requestId is not None:
                raise ValueError("kind 'pair' carries prompt/messages + completion, not requestId")
            if not self.adapter:
                raise ValueError("kind 'pair' needs 'adapter'")
            if (self.prompt is None) == (self.messages is None):
                raise ValueError("kind 'pair' needs exactly one of 'prompt' or 'messages'")
            if not self.completion:
                raise ValueError("kind 'pair' needs a non-empty 'completion'")
        else:
            if not self.requestId:
                raise ValueError(f"kind {self.kind!r} refers to a served request: 'requestId' is required")
            if self.prompt is not None or self.messages is not None:
                raise ValueError("prompt/messages are only allowed with kind 'pair'")
        if self.kind == "correction" and not self.completion:
            raise ValueError("kind 'correction' needs a non-empty 'completion'")
        if self.kind in ("accept", "reject", "reward") and self.completion is not None:
            raise ValueError(f"kind {self.kind!r} takes no 'completion'")
        if self.kind == "reward":
            if self.reward is None or not -1.0 <= self.reward <= 1.0:
                raise ValueError("kind 'reward' needs 'reward' in [-1, 1]")
        elif self.reward is not None:
            raise ValueError("'reward' is only allowed with kind 'reward'")
        if self.messages is not None:
            for m in self.messages:
                if set(m) != {"role", "content"} or m["role"] not in ("system", "user", "assistant"):
                    raise ValueError("messages must be {role: system|user|assistant, content: str} objects")
        return self
