"""The framed feedback log never loses an acknowledged record: torn tail, damage in the middle, unknown fields, a
newer version's records, a full disk and SIGKILL in the middle of a write.

The crash cases run a real writer process (the only way to kill a write half-way) and compare what it printed as
acknowledged (after `append` returned, i.e. after the fsync) with what a fresh store reads back.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys

import pytest
from lorafleet.worker.feedback.log import HEADER, frame
from lorafleet.worker.feedback.store import FeedbackSample, FeedbackStore

WRITER = r"""
import resource, signal, sys
from lorafleet.worker.feedback.store import FeedbackSample, FeedbackStore
path, size, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit a write fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
st = FeedbackStore(path)
print("open", len(st), flush=True)
i = 0
while True:
    s = FeedbackSample("ad", "pair", list(range(size)), [i], feedback_id=f"fb-{i}")
    try:
        st.append(s)
    except OSError as exc:
        print("fail", exc.errno, flush=True)
        i += 1
        if i > 10_000:
            break
        continue
    print("ack", s.feedback_id, flush=True)  # acknowledged: what a 202 promises
    i += 1
"""


def _sample(i: int, **kw) -> FeedbackSample:
    return FeedbackSample("ad", "pair", [1, i], [2, i], feedback_id=f"fb-{i}", **kw)


def _ids(store: FeedbackStore) -> list[str]:
    return [s.feedback_id for s in store.samples()]


def test_torn_last_record_is_cut_after_being_copied_aside(tmp_path):
    path = tmp_path / "feedback.log"
    st = FeedbackStore(path)
    for i in range(3):
        st.append(_sample(i))
    st.close()
    torn = frame(_sample(3).to_json().encode())[:-5]  # a crash in the middle of the fourth write
    with open(path, "ab") as fh:
        fh.write(torn)
    st = FeedbackStore(path)
    assert _ids(st) == ["fb-0", "fb-1", "fb-2"]
    assert st.recovered_torn_bytes == len(torn) and st.skipped_garbage_bytes == 0
    (aside,) = tmp_path.glob("feedback.log.torn-*")
    assert aside.read_bytes() == torn  # nothing destroyed: the cut bytes are kept
    assert st.append(_sample(4)).seq == 3
    st.close()
    assert _ids(FeedbackStore(path)) == ["fb-0", "fb-1", "fb-2", "fb-4"]


def test_garbage_in_the_middle_is_skipped_and_nothing_after_it_is_lost(tmp_path):
    path = tmp_path / "feedback.log"
    st = FeedbackStore(path)
    st.append(_sample(0))
    st.append(_sample(1))
    st.close()
    with open(path, "ab") as fh:
        fh.write(b"\x00" * 100 + b"LFB1" + b"garbage that looks like a frame start")
    st = FeedbackStore(path)
    st.append(_sample(2))
    st.append(_sample(3))
    st.close()
    size = path.stat().st_size
    # flip a byte inside record 1's payload: its CRC fails, the records around it stay
    data = bytearray(path.read_bytes())
    first = HEADER.size + len(_sample(0).to_json())  # where record 1 starts
    data[first + HEADER.size + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    st = FeedbackStore(path)
    assert _ids(st) == ["fb-0", "fb-2", "fb-3"]
    assert st.skipped_garbage_bytes > 100 and st.recovered_torn_bytes == 0
    assert path.stat().st_size == size  # never truncated


def test_unknown_fields_and_newer_records_are_kept(tmp_path):
    path = tmp_path / "feedback.log"
    newer = {**json.loads(_sample(1).to_json()), "v": 2, "confidence": 0.9, "grader": {"name": "g", "run": 7}}
    unreadable = {"v": 3, "format": "something else entirely"}  # verifies, but this version cannot train on it
    with open(path, "wb") as fh:
        fh.write(frame(_sample(0).to_json().encode()))
        fh.write(frame(json.dumps(newer).encode()))
        fh.write(frame(json.dumps(unreadable).encode()))
        fh.write(frame(_sample(2).to_json().encode()))
    before = path.read_bytes()
    st = FeedbackStore(path)
    assert _ids(st) == ["fb-0", "fb-1", "fb-2"]
    assert st.unreadable_records == 1
    s1 = st.samples()[1]
    assert s1.extra == {"v": 2, "confidence": 0.9, "grader": {"name": "g", "run": 7}}
    assert json.loads(s1.to_json())["grader"] == {"name": "g", "run": 7}  # written back unchanged
    st.close()
    assert path.read_bytes() == before


def _run_writer(path, size: int, limit: int = 0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(size), str(limit)], stdout=subprocess.PIPE, text=True
    )


def test_full_disk_fails_the_write_and_keeps_every_acknowledged_record(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG), as a full disk refuses them (ENOSPC)."""
    path = tmp_path / "feedback.log"
    proc = _run_writer(path, 300, limit=20_000)
    acked, fails = [], 0
    assert proc.stdout is not None
    for line in proc.stdout:
        kind, _, value = line.strip().partition(" ")
        if kind == "ack":
            acked.append(value)
        elif kind == "fail":
            fails += 1
            if fails >= 3:
                break
    proc.kill()
    proc.wait(30)
    assert acked and fails >= 3
    st = FeedbackStore(path)
    assert _ids(st) == acked  # every acknowledged record, in order; no failed one
    assert st.recovered_torn_bytes == 0 and st.skipped_garbage_bytes == 0  # failed writes were cut back


def test_sigkill_during_writes_loses_no_acknowledged_record(tmp_path):
    rng = random.Random(15)
    for case in range(3):
        path = tmp_path / f"case{case}" / "feedback.log"
        path.parent.mkdir()
        proc = _run_writer(path, 20_000)  # ~100 KB records: a kill lands inside a write often
        acked: list[str] = []
        stop_after = rng.randint(3, 30)
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("open")
        for line in proc.stdout:
            if line.startswith("ack "):
                acked.append(line.split()[1])
            if len(acked) >= stop_after:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        acked += [line.split()[1] for line in proc.stdout if line.startswith("ack ")]  # printed before the kill
        got = _ids(FeedbackStore(path))
        assert got[: len(acked)] == acked  # every acknowledged record, in order
        assert len(got) <= len(acked) + 1  # at most the one whose fsync returned as the kill came


def test_a_json_lines_log_is_refused_not_ignored(tmp_path):
    (tmp_path / "feedback.jsonl").write_text(_sample(0).to_json() + "\n")
    with pytest.raises(ValueError, match="JSON-lines feedback log"):
        FeedbackStore(tmp_path / "feedback.log")
    assert not (tmp_path / "feedback.log").exists()
