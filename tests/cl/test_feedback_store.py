"""The feedback log is durable, replayed on start, and survives a torn (never acknowledged) last record; peers read
every complete record once (recovery cases in depth: test_feedback_log.py)."""

from __future__ import annotations

from lorafleet.worker.feedback.log import frame
from lorafleet.worker.feedback.store import FeedbackSample, FeedbackStore, PeerFeedbackLogs
from lorafleet.worker.training.replay import ReplayMixer, chunk_tokens


def test_append_replay_and_torn_tail(tmp_path):
    path = tmp_path / "fb" / "feedback.log"
    st = FeedbackStore(path)
    seen = []
    st.subscribe(seen.append)
    a = st.append(FeedbackSample("ad", "pair", [1, 2], [3, 4]))
    b = st.append(FeedbackSample("ad", "reject", [1, 2], [5], weight=0.0))
    c = st.append(FeedbackSample("other", "accept", [7], [8, 9], request_id="r1", served_version=3))
    assert [s.seq for s in (a, b, c)] == [0, 1, 2] and seen == [a, b, c]
    assert not b.trainable and a.trainable
    st.close()
    with open(path, "ab") as fh:
        fh.write(frame(b'{"adapter":"ad","kind":"pair"}')[:-3])  # a crash in the middle of a write
    st2 = FeedbackStore(path)
    assert st2.recovered_torn_bytes > 0
    assert [s.feedback_id for s in st2.samples()] == [a.feedback_id, b.feedback_id, c.feedback_id]
    assert [s.completion_ids for s in st2.samples("ad")] == [[3, 4], [5]]
    assert st2.samples("other")[0].served_version == 3
    d = st2.append(FeedbackSample("ad", "pair", [1], [2]))
    assert d.seq == 3
    st2.close()
    assert len(FeedbackStore(path)) == 4


def test_peer_logs_give_every_complete_line_once_and_never_a_torn_one(tmp_path):
    """A trainer reads the pool's other workers' logs: all of them when a job starts, then only what was appended;
    never its own log, never a torn last line (until its writer completes it), never a line twice; a worker that
    appears later is read from its start."""
    workers = tmp_path / "workers"
    me = FeedbackStore(workers / "me" / "feedback.log")
    me.append(FeedbackSample("ad", "pair", [1], [2]))
    b = FeedbackStore(workers / "b" / "feedback.log")
    b0 = b.append(FeedbackSample("ad", "pair", [1, 2], [3]))
    b.append(FeedbackSample("other", "pair", [4], [5]))
    peers = PeerFeedbackLogs(workers, workers / "me")
    peers.prime()
    assert [s.feedback_id for s in peers.read_all("ad")] == [b0.feedback_id]  # a job starting now
    assert peers.poll() == []  # nothing new
    b1 = b.append(FeedbackSample("ad", "pair", [6], [7]))
    late = frame(b'{"adapter":"ad","kind":"pair","prompt_ids":[8],"completion_ids":[9],"feedback_id":"fb-late"}')
    with open(b.path, "ab") as fh:  # b's next write, torn (never acknowledged)
        fh.write(late[:20])
    got = peers.poll()
    assert [(s.feedback_id, s.seq) for s in got] == [(b1.feedback_id, 2)]
    assert peers.poll() == []
    with open(b.path, "ab") as fh:  # ... completed: a whole record now, then one that verifies but does not parse
        fh.write(late[20:])
        fh.write(frame(b"not json"))
    assert [(s.feedback_id, s.seq) for s in peers.poll()] == [("fb-late", 3)] and peers.bad_lines == 1
    c = FeedbackStore(workers / "c" / "feedback.log")  # a worker started after the trainer
    c0 = c.append(FeedbackSample("ad", "pair", [1], [2]))
    assert [s.feedback_id for s in peers.poll()] == [c0.feedback_id]
    assert len(peers.logs()) == 2  # b and c, not this worker's own


def test_replay_ratio_and_forgetting_reweighting():
    doms = {"x": chunk_tokens(list(range(1000)), 50), "y": chunk_tokens(list(range(1000, 2000)), 50)}
    mix = ReplayMixer(doms, ratio=0.25, seed=1)
    picks = [mix.next_is_replay() for _ in range(400)]
    assert sum(picks) == 100
    w0 = mix.weights()
    assert abs(w0["x"] - 0.5) < 1e-9
    mix.observe("x", 2.0)
    mix.observe("y", 2.0)
    for _ in range(10):
        mix.observe("x", 2.6)  # the model is forgetting domain x
        mix.observe("y", 2.0)
    w = mix.weights()
    assert w["x"] > 0.7
    drawn = [mix.draw().domain for _ in range(300)]
    assert drawn.count("x") > 200
