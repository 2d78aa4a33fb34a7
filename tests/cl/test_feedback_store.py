"""The feedback log is durable, replayed on start, and survives a torn (never acknowledged) last line."""

from __future__ import annotations

from lorafleet.worker.training.feedback import FeedbackSample, FeedbackStore
from lorafleet.worker.training.replay import ReplayMixer, chunk_tokens


def test_append_replay_and_torn_tail(tmp_path):
    path = tmp_path / "fb" / "feedback.jsonl"
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
        fh.write(b'{"adapter":"ad","kind":"pa')  # a crash in the middle of a write
    st2 = FeedbackStore(path)
    assert st2.recovered_torn_bytes > 0
    assert [s.feedback_id for s in st2.samples()] == [a.feedback_id, b.feedback_id, c.feedback_id]
    assert [s.completion_ids for s in st2.samples("ad")] == [[3, 4], [5]]
    assert st2.samples("other")[0].served_version == 3
    d = st2.append(FeedbackSample("ad", "pair", [1], [2]))
    assert d.seq == 3
    st2.close()
    assert len(FeedbackStore(path)) == 4


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
