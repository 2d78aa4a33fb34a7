"""Durable, append-only feedback store.

Why: a 2xx on `POST /v1/feedback` is a promise that the sample will be trained on. The sample is fully resolved
(prompt and completion token ids, not just a request id that may expire) and appended to a framed log
(`log.py`: length + CRC-32 per record) that is `fsync`ed before the caller returns, so a crash at any point
after the 2xx loses nothing; on start the log is replayed, keeping every record that verifies wherever damage is.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lorafleet.worker.feedback.log import FramedLog, scan

log = logging.getLogger(__name__)
TRAINABLE_KINDS = ("accept", "correction", "pair", "reward")
ALL_KINDS = (*TRAINABLE_KINDS, "reject")
RECORD_VERSION = 1


@dataclass
class FeedbackSample:
    """One resolved feedback sample; `weight` scales its loss (0 = recorded but never trained on). `extra` holds the
    fields of a record that this version does not know (written by a newer worker): kept, written back unchanged."""

    adapter: str
    kind: str
    prompt_ids: list[int]
    completion_ids: list[int]
    weight: float = 1.0
    request_id: str | None = None
    served_version: int | None = None
    feedback_id: str = field(default_factory=lambda: f"fb-{uuid.uuid4().hex[:16]}")
    created_at: float = field(default_factory=time.time)
    seq: int = -1
    extra: dict = field(default_factory=dict)

    @property
    def trainable(self) -> bool:
        return self.kind in TRAINABLE_KINDS and self.weight > 0 and len(self.completion_ids) > 0

    def to_json(self) -> str:
        d = asdict(self)
        extra = d.pop("extra")
        return json.dumps({**extra, **d, "v": max(RECORD_VERSION, int(extra.get("v", 0) or 0))}, separators=(",", ":"))

    @staticmethod
    def from_json(line: str | bytes) -> FeedbackSample:
        """Parses a record; unknown fields go to `extra`; a record without the fields training needs (or with the
        wrong types) raises ValueError."""
        d = json.loads(line)
        if not isinstance(d, dict):
            raise ValueError("a feedback record is a JSON object")
        known = {f.name for f in fields(FeedbackSample)} - {"extra"}
        extra = {k: v for k, v in d.items() if k not in known}
        sample = FeedbackSample(**{k: v for k, v in d.items() if k in known}, extra=extra)
        if not (isinstance(sample.adapter, str) and isinstance(sample.kind, str)):
            raise ValueError("adapter and kind are strings")
        for ids in (sample.prompt_ids, sample.completion_ids):
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("token ids are lists of integers")
        if isinstance(sample.weight, bool) or not isinstance(sample.weight, int | float):
            raise ValueError("weight is a number")
        return sample


def _decode(payload: bytes) -> FeedbackSample | None:
    try:
        return FeedbackSample.from_json(payload)
    except (ValueError, TypeError, RecursionError):
        return None


class FeedbackStore:
    """Append-only framed log of feedback; thread-safe; subscribers see every new sample after it is durable."""

    def __init__(self, path: str | Path, fsync: bool = True) -> None:
        self.path = Path(path)
        legacy = self.path.with_suffix(".jsonl")
        if legacy.exists():  # refused, not ignored: its samples were acknowledged
            raise ValueError(f"{legacy} is a JSON-lines feedback log, a format this worker does not read")
        self._lock = threading.Lock()
        self._samples: list[FeedbackSample] = []
        self._subscribers: list[Callable[[FeedbackSample], None]] = []
        self._log = FramedLog(self.path, fsync=fsync)
        self.recovered_torn_bytes = self._log.torn_bytes
        self.skipped_garbage_bytes = self._log.garbage_bytes
        self.unreadable_records = 0
        for payload in self._log.records:
            sample = _decode(payload)
            if sample is None:  # verified bytes this version cannot read: kept on disk, skipped here
                self.unreadable_records += 1
                continue
            sample.seq = len(self._samples)
            self._samples.append(sample)
        if self.unreadable_records:
            log.warning("feedback log %s: %d records this version cannot read", self.path, self.unreadable_records)

    def append(self, sample: FeedbackSample) -> FeedbackSample:
        """Writes and fsyncs the sample, then notifies subscribers; returns it with its sequence number. Raises
        OSError (nothing stored, nothing acknowledged) when the disk refuses the write."""
        with self._lock:
            self._log.append(sample.to_json().encode())
            sample.seq = len(self._samples)
            self._samples.append(sample)
            subs = list(self._subscribers)
        for fn in subs:
            fn(sample)
        return sample

    def subscribe(self, fn: Callable[[FeedbackSample], None]) -> None:
        with self._lock:
            self._subscribers.append(fn)

    def samples(self, adapter: str | None = None, since_seq: int = 0) -> list[FeedbackSample]:
        with self._lock:
            return [s for s in self._samples[since_seq:] if adapter is None or s.adapter == adapter]

    def __len__(self) -> int:
        return len(self._samples)

    def close(self) -> None:
        with self._lock:
            self._log.close()


class PeerFeedbackLogs:
    """The feedback logs of the pool's other workers, read-only, in the shared adapter store
    (`<root>/.lorafleet-training/workers/<worker id>/feedback.log`, one writer each).

    Why: feedback is accepted by whichever replica served the request (a request id is only known there), but an
    adapter's job trains on one worker, and after a failover on another one. A 2xx is a promise that the sample
    is trained on, so the trainer reads every peer's log too: all of it when a job starts (or moves here), then what
    was appended since, on every `poll`. Only complete records are read (a torn last one was never acknowledged, and
    its owner cuts it on restart); damage in the middle, or a record that does not parse, is skipped and counted. A sample may be
    offered twice (a job started while a poll was reading): the job ignores a feedback id it has seen."""

    def __init__(self, workers_dir: str | Path, own_dir: str | Path) -> None:
        self.dir = Path(workers_dir)
        self.own = Path(own_dir).resolve()
        self._pos: dict[Path, tuple[int, int]] = {}  # log -> (byte offset of the next line, its seq)
        self.bad_lines = 0
        self._primed = False

    def logs(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return [p for p in sorted(self.dir.glob("*/feedback.log")) if p.parent.resolve() != self.own]

    def _read(self, path: Path, offset: int, seq: int) -> tuple[list[FeedbackSample], int, int]:
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < offset:  # replaced or cut below what was read: read it again (the job de-duplicates)
                    offset, seq = 0, 0
                fh.seek(offset)
                data = fh.read(size - offset)
        except OSError:
            return [], offset, seq
        out: list[FeedbackSample] = []
        found = scan(data)
        self.bad_lines += len(found.garbage)
        for _, _, payload in found.records:
            s = _decode(payload)
            if s is None:
                self.bad_lines += 1
            else:
                s.seq = seq
                out.append(s)
            seq += 1
        return out, offset + found.tail, seq

    def read_all(self, adapter: str | None = None) -> list[FeedbackSample]:
        """Every complete sample of every peer log (for a job that starts here), oldest log first."""
        out: list[FeedbackSample] = []
        for p in self.logs():
            samples, _, _ = self._read(p, 0, 0)
            out += [s for s in samples if adapter is None or s.adapter == adapter]
        return out

    def prime(self) -> None:
        """Positions every existing peer log at its end, before any job is created here: what they hold by then is
        what `read_all` gives a job that starts; `poll` gives what comes after."""
        for p in self.logs():
            try:
                found = scan(p.read_bytes())
            except OSError:
                continue  # unreadable now: `poll` reads it from its start once it can
            self._pos[p] = (found.tail, len(found.records))
        self._primed = True

    def poll(self) -> list[FeedbackSample]:
        """Samples appended to any peer log since the previous poll; a log that appeared after `prime` (a worker
        started later) is read from its start."""
        if not self._primed:
            self.prime()
        out: list[FeedbackSample] = []
        for p in self.logs():
            offset, seq = self._pos.get(p, (0, 0))
            samples, end, seq = self._read(p, offset, seq)
            self._pos[p] = (end, seq)
            out += samples
        return out
