"""LoRA Fleet: operator and worker engine for fleets of LLMs serving many LoRA adapters."""

__version__ = "0.1.0"
