"""Durable, append-only feedback store.

Why: a 2xx on `POST /v1/feedback` is a promise that the sample will be trained on. The sample is fully resolved
(prompt and completion token ids, not just a request id that may expire) and appended to a JSONL file that is
`fsync`ed before the caller returns, so a crash at any point after the 2xx loses nothing; on start the file is
replayed. A torn last line (a crash in the middle of a write, which was never acknowledged) is truncated away.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

TRAINABLE_KINDS = ("accept", "correction", "pair", "reward")
ALL_KINDS = (*TRAINABLE_KINDS, "reject")


@dataclass
class FeedbackSample:
    """One resolved feedback sample; `weight` scales its loss (0 = recorded but never trained on)."""

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

    @property
    def trainable(self) -> bool:
        return self.kind in TRAINABLE_KINDS and self.weight > 0 and len(self.completion_ids) > 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @staticmethod
    def from_json(line: str) -> FeedbackSample:
        return FeedbackSample(**json.loads(line))


def scan_lines(data: bytes) -> Iterator[tuple[int, FeedbackSample | None]]:
    """The complete lines of a feedback log: (offset just past the line, its sample, or None where it does not
    parse). A last line without its newline is never given: it is a torn or still-running append, and the 2xx of
    a sample follows the fsync of its whole line. The owner and the peer readers differ only in what a bad line
    means: the owner cuts its log there, a reader skips it."""
    pos = 0
    while (nl := data.find(b"\n", pos)) >= 0:
        try:
            sample: FeedbackSample | None = FeedbackSample.from_json(data[pos:nl].decode())
        except (ValueError, TypeError):
            sample = None
        pos = nl + 1
        yield pos, sample


class FeedbackStore:
    """Append-only JSONL log of feedback; thread-safe; subscribers see every new sample after it is durable."""

    def __init__(self, path: str | Path, fsync: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._lock = threading.Lock()
        self._samples: list[FeedbackSample] = []
        self._subscribers: list[Callable[[FeedbackSample], None]] = []
        self.recovered_torn_bytes = 0
        self._replay()
        new = not self.path.exists()
        self._fh = open(self.path, "ab")  # noqa: SIM115 - held open for the store's lifetime
        if new and fsync:
            _fsync_dir(self.path.parent)

    def _replay(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end = 0
        for end, sample in scan_lines(data):
            if sample is None:  # the owner cuts its log at the first bad line (a reader skips it)
                break
            sample.seq = len(self._samples)
            self._samples.append(sample)
            good_end = end
        if good_end < len(data):
            # Never acknowledged (the 2xx follows the fsync of a complete line): cut it so appends stay parseable.
            self.recovered_torn_bytes = len(data) - good_end
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
                fh.flush()
                os.fsync(fh.fileno())

    def append(self, sample: FeedbackSample) -> FeedbackSample:
        """Writes and fsyncs the sample, then notifies subscribers; returns it with its sequence number."""
        with self._lock:
            sample.seq = len(self._samples)
            self._fh.write(sample.to_json().encode() + b"\n")
            self._fh.flush()
            if self._fsync:
                os.fsync(self._fh.fileno())
            self._samples.append(sample)
            subs = list(self._subscribers)
        for fn in subs:
            fn(sample)
        return sample

    def subscribe(self, fn: Callable[[FeedbackSample], None]) -> None:
        with self._lock:
            self._subscribers.append(fn)

    def unsubscribe(self, fn: Callable[[FeedbackSample], None]) -> None:
        with self._lock:
            if fn in self._subscribers:
                self._subscribers.remove(fn)

    def samples(self, adapter: str | None = None, since_seq: int = 0) -> list[FeedbackSample]:
        with self._lock:
            return [s for s in self._samples[since_seq:] if adapter is None or s.adapter == adapter]

    def __len__(self) -> int:
        return len(self._samples)

    def close(self) -> None:
        with self._lock:
            self._fh.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PeerFeedbackLogs:
    """The feedback logs of the pool's other workers, read-only, in the shared adapter store
    (`<root>/.lorafleet-training/workers/<worker id>/feedback.jsonl`, one writer each).

    Why: feedback is accepted by whichever replica served the request (a request id is only known there), but an
    adapter's job trains on one worker, and after a failover on another one. A 2xx is a promise that the sample
    is trained on, so the trainer reads every peer's log too: all of it when a job starts (or moves here), then what
    was appended since, on every `poll`. Only complete lines are read (a torn last line was never acknowledged, and
    its owner cuts it on restart); a complete line that does not parse is skipped and counted. A sample may be
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
        return [p for p in sorted(self.dir.glob("*/feedback.jsonl")) if p.parent.resolve() != self.own]

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
        pos = 0
        for pos, s in scan_lines(data):  # noqa: B007 - pos is read after the loop: the end of the last whole line
            if s is None:
                self.bad_lines += 1
            else:
                s.seq = seq
                out.append(s)
            seq += 1
        return out, offset + pos, seq

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
                data = p.read_bytes()
            except OSError:
                continue  # unreadable now: `poll` reads it from its start once it can
            end = data.rfind(b"\n") + 1  # complete lines only; no need to parse what no job asked for yet
            self._pos[p] = (end, data.count(b"\n", 0, end))
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
