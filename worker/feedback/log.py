"""The on-disk format of the feedback log: framed records (magic, length, CRC-32) appended and fsynced one by one.

Why frames and not JSON lines: a 2xx on `/v1/feedback` promises the sample is trained on, so recovery must keep every
record that was ever acknowledged, whatever else is in the file. A line format can only guess where damage ends;
a frame says how long it is and proves its bytes with a checksum, so recovery keeps every record that verifies,
resynchronises on the next magic after garbage in the middle (counted and logged, its bytes left in place), and
treats only bytes after the last valid record as a torn tail: a write that was cut off, never acknowledged (the
2xx follows the fsync of the whole frame). The torn tail is copied aside before it is cut, so nothing is ever
destroyed. Payloads are JSON objects; fields this version does not know are kept (`FeedbackSample.extra`), so a
record written by a newer worker is read, not fatal.

Layout of one record: `b"LFB1"`, payload length (u32 LE), CRC-32 of the payload (u32 LE), payload (UTF-8 JSON).
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.worker.durable import fsync_path

log = logging.getLogger(__name__)

MAGIC = b"LFB1"
HEADER = struct.Struct("<4sII")
MAX_RECORD = 16 << 20  # far above any sample (the API caps one at 4096 tokens); a larger length is damage


def frame(payload: bytes) -> bytes:
    """One record's bytes."""
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def _frame_at(data: bytes, pos: int) -> int | None:
    """The end offset of a valid record starting at `pos`, or None."""
    if len(data) - pos < HEADER.size:
        return None
    magic, length, crc = HEADER.unpack_from(data, pos)
    end = pos + HEADER.size + length
    if magic != MAGIC or length > MAX_RECORD or end > len(data):
        return None
    if zlib.crc32(data[pos + HEADER.size : end]) != crc:
        return None
    return end


def _next_valid(data: bytes, pos: int) -> int | None:
    """The start of the next valid record at or after `pos`, or None."""
    while (at := data.find(MAGIC, pos)) >= 0:
        if _frame_at(data, at) is not None:
            return at
        pos = at + 1
    return None


@dataclass
class Scan:
    """What a pass over log bytes found: records as (start, end, payload), garbage ranges between valid records,
    and where the torn tail starts (the data's length when there is none)."""

    records: list[tuple[int, int, bytes]] = field(default_factory=list)
    garbage: list[tuple[int, int]] = field(default_factory=list)
    tail: int = 0

    @property
    def garbage_bytes(self) -> int:
        return sum(b - a for a, b in self.garbage)


def scan(data: bytes, base: int = 0) -> Scan:
    """Every valid record of `data` (offsets relative to `base`); never stops at damage in the middle."""
    out = Scan()
    pos = 0
    while pos < len(data):
        end = _frame_at(data, pos)
        if end is not None:
            out.records.append((base + pos, base + end, data[pos + HEADER.size : end]))
            pos = end
            continue
        nxt = _next_valid(data, pos + 1)
        if nxt is None:
            break
        out.garbage.append((base + pos, base + nxt))
        pos = nxt
    out.tail = base + pos
    return out


class FramedLog:
    """The owner's handle on a framed log: recovery on open, then fsynced appends (one writer per file).

    `recovered` counts what the opening pass found: valid records, garbage bytes skipped in the middle and torn
    tail bytes cut off (after being copied to `<name>.torn-<ns>`)."""

    def __init__(self, path: str | Path, fsync: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        new = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        if new and fsync:
            fsync_path(self.path.parent)
        data = self.path.read_bytes()
        found = scan(data)
        self.records = [payload for _, _, payload in found.records]
        self.garbage_bytes = found.garbage_bytes
        self.torn_bytes = len(data) - found.tail
        for a, b in found.garbage:
            log.warning("feedback log %s: skipped %d damaged bytes at offset %d (kept in place)", self.path, b - a, a)
        if self.torn_bytes:
            aside = self.path.with_name(f"{self.path.name}.torn-{time.time_ns()}")
            aside.write_bytes(data[found.tail :])
            if fsync:
                fsync_path(aside)
            os.ftruncate(self._fd, found.tail)
            if fsync:
                os.fsync(self._fd)
            log.warning(
                "feedback log %s: cut a torn tail of %d bytes at offset %d (a write never acknowledged; copied to %s)",
                self.path,
                self.torn_bytes,
                found.tail,
                aside.name,
            )
        self._size = found.tail

    def append(self, payload: bytes) -> None:
        """Writes one record and fsyncs it; on any failure (a full disk) the partial frame is cut again and the
        error raised, so the caller answers with an error and the file holds only whole records."""
        data = frame(payload)
        start = self._size
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            if self._fsync:
                os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                log.exception("feedback log %s: cannot cut a failed write (the next open skips it)", self.path)
            raise
        self._size = start + len(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
