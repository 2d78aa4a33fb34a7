"""The one error every source raises: it names the source, so the operator's condition can say which one failed."""

from __future__ import annotations

from lorafleet.worker.lora.adapter import AdapterError


class SourceError(AdapterError):
    """A source could not be resolved into verified local weights (missing, denied, corrupt, unreachable).

    An `AdapterError`, so the load API answers 400 with the message and the adapter's current version keeps serving.
    """

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason
