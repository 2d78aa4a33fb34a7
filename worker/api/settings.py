"""Settings of the HTTP layer (the engine's own knobs live in `EngineConfig`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ApiSettings:
    """What the API needs to know beyond the engine.

    `served_model_name` is the `model` value that selects the base model (vLLM's --served-model-name); any other
    value names an adapter. `admin_token`, when set, guards the admin endpoints (load/unload/list adapters).
    """

    served_model_name: str
    model_path: str = ""
    admin_token: str | None = None
    max_model_len: int | None = None
    max_prompt_chars: int = 1 << 20
