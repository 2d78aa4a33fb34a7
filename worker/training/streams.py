"""Where graphed training pieces run on a GPU: the job's placement, turned into a CUDA stream.

- `serving` (default): the serving stream itself. A piece queued right behind a serving step never overlaps a
  serving kernel; one that outlasts the host's gap delays the next step by the overrun (the controller sizes
  pieces to the gap).
- `partition` (experimental): a lowest-priority stream on an SM partition (green context, worker/sm_partition.py)
  that leaves `serving_sms` SMs to serving. Where the driver cannot make one, pieces run on the serving stream and
  the reason is reported (status `coServing.reason`).

docs/coserving.md has the measurements behind the choice.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from lorafleet.worker.sm_partition import PartitionUnavailable, sm_partition

log = logging.getLogger(__name__)

PLACEMENTS = ("serving", "partition")


@dataclass
class Placement:
    stream: object | None  # None on CPU: pieces run inline
    mode: str  # the placement in effect: serving | partition | cpu
    fallback: str = ""  # why `mode` is not the placement asked for


def check_placement(placement: str) -> str:
    """`placement`, or ValueError when it is none of PLACEMENTS (the API's check and the trainer's are this one)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    return placement


def training_stream(device: torch.device, placement: str, serving_sms: int) -> Placement:
    """The stream for `placement` (one of PLACEMENTS); built in the engine thread, whose current stream serves.
    An unknown placement is refused on every device, so a CPU test sees what a GPU job would."""
    check_placement(placement)
    if device.type != "cuda":
        return Placement(None, "cpu")
    if placement == "partition":
        total = torch.cuda.get_device_properties(device).multi_processor_count
        try:
            part = sm_partition(device, total - serving_sms)
            log.info("co-serving pieces on %d of %d SMs", part.sms, part.total_sms)
            return Placement(part.stream, "partition")
        except (PartitionUnavailable, ValueError) as exc:
            log.warning("no SM partition for training (%s): its pieces run on the serving stream", exc)
            fallback = f"no SM partition ({exc}): pieces run on the serving stream"
            return Placement(torch.cuda.current_stream(device), "serving", fallback)
    return Placement(torch.cuda.current_stream(device), "serving")


def capture_stream(stream, device: torch.device):
    """Where graphs are captured. CUDA cannot capture on the legacy default stream (serving there:
    LORAFLEET_SERVING_STREAM=default): such a graph is captured on a side stream (None: torch's) and still replays
    on the training stream. A partition stream captures itself: replays keep the SM restriction of the stream they
    were captured on."""
    return None if stream == torch.cuda.default_stream(device) else stream


def on(stream):
    """A context that queues work on `stream` (inline without one)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
