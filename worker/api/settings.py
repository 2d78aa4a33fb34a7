"""Settings of the HTTP layer (the engine's own knobs live in `EngineConfig`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class ApiSettings:
    """What the API needs to know beyond the engine.

    `served_model_name` is the `model` value that selects the base model (vLLM's --served-model-name); any other
    value names an adapter. `admin_token`, `api_key` and `feedback_api_key` are the three credentials of
    `worker/api/auth.py`. `feedback_adapters` are the adapters whose feedback is accepted without a training job
    for them (`*`: any adapter name). `max_body_bytes` bounds every request body (413 above it).
    `allowed_origins` and friends are vLLM's CORS options. `offload_threads` and `offload_backlog` size the pool
    for parsing, tokenizing and serialising big payloads off the event loop (offload.py: more admitted jobs than
    their sum get 429); `max_tokenize_tokens` caps the token list of one `/tokenize` answer.
    """

    served_model_name: str
    model_path: str = ""
    admin_token: str | None = None
    api_key: str | None = None
    feedback_api_key: str | None = None
    feedback_adapters: tuple[str, ...] = ()
    max_model_len: int | None = None
    max_prompt_chars: int = 1 << 20
    max_body_bytes: int = 4 << 20
    chat_template_timeout_s: float = 2.0
    offload_threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    offload_backlog: int = 8
    max_tokenize_tokens: int = 1 << 17
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
