"""The worker's HTTP API: OpenAI completions/chat, vLLM dynamic-LoRA admin, health, readiness and metrics."""

from lorafleet.worker.api.app import create_app
from lorafleet.worker.api.settings import ApiSettings

__all__ = ["ApiSettings", "create_app"]
