"""LLMEngine API: sampling (seeded, top-k/top-p), stop strings / stop ids, validation errors, abort, hooks, stats."""

from __future__ import annotations

import pytest
import torch
from lorafleet.worker.engine.sampler import Sampler
from lorafleet.worker.engine.sequence import SamplingParams
from lorafleet.worker.lora.adapter import UnknownAdapterError
from lorafleet.worker.testing import StepLog

PROMPT = [12, 40, 77, 301, 5, 64, 200]


def _run(eng):
    final = {}
    while eng.has_unfinished_requests():
        final.update({o.request_id: o for o in eng.step() if o.finished})
    return final


def test_seeded_sampling_is_reproducible_whatever_the_batch(make_engine):
    eng = make_engine()
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=15, ignore_eos=True)
    alone = eng.generate([PROMPT], p)[0].output_token_ids
    others = SamplingParams(temperature=1.0, max_tokens=15, ignore_eos=True)
    for i in range(5):
        eng.add_request(f"noise{i}", [9 + i, 8, 7, 6], others)
    eng.add_request("seeded", PROMPT, p)
    eng.add_request(
        "seeded2", PROMPT, SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=15, ignore_eos=True)
    )
    final = _run(eng)
    assert final["seeded"].output_token_ids == alone
    assert final["seeded2"].output_token_ids != alone
    greedy = eng.generate([PROMPT], SamplingParams(temperature=0, max_tokens=15, ignore_eos=True))[0]
    topk1 = eng.generate([PROMPT], SamplingParams(temperature=1.5, top_k=1, max_tokens=15, ignore_eos=True))[0]
    tiny_p = eng.generate([PROMPT], SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=15, ignore_eos=True))[0]
    assert topk1.output_token_ids == greedy.output_token_ids == tiny_p.output_token_ids


def test_sampler_distribution_respects_temperature_top_k_top_p():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(torch.device("cpu"), seed=0)
    n = 4000
    draws = s(logits.repeat(n, 1), [SamplingParams(temperature=1.0)] * n, [None] * n)
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / n
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    k2 = s(logits.repeat(n, 1), [SamplingParams(top_k=2)] * n, [None] * n)
    assert set(k2) == {0, 1} and abs(k2.count(0) / n - 0.625) < 0.03
    p = s(logits.repeat(n, 1), [SamplingParams(top_p=0.7)] * n, [None] * n)  # keeps 0.5 + 0.3
    assert set(p) == {0, 1}
    hot = s(logits.repeat(n, 1), [SamplingParams(temperature=100.0)] * n, [None] * n)
    assert min(torch.bincount(torch.tensor(hot), minlength=4).tolist()) > n * 0.2  # ~uniform


def test_stop_strings_stop_ids_and_incremental_text(make_engine):
    eng = make_engine()
    base = eng.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    full = eng.tokenizer.decode(base.output_token_ids, skip_special_tokens=True)
    assert base.text == full  # incremental detokenization == one-shot decode
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    out = eng.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == full[: full.index(stop)]
    stop_id = base.output_token_ids[4]
    out = eng.generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id], ignore_eos=True)
    )[0]
    k = base.output_token_ids.index(stop_id)
    assert out.finish_reason == "stop" and out.output_token_ids == base.output_token_ids[: k + 1]
    out = eng.generate([PROMPT], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.output_token_ids == base.output_token_ids[:3]


def test_eos_finishes_unless_ignored(make_engine):
    eng = make_engine()
    base = eng.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    eng.eos_token_ids = {base.output_token_ids[2]}
    out = eng.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20))[0]
    assert out.finish_reason == "stop" and len(out.output_token_ids) <= 3


def test_request_validation(make_engine):
    eng = make_engine(max_model_len=32)
    bad = [
        SamplingParams(temperature=-1),
        SamplingParams(top_p=0),
        SamplingParams(top_k=0),
        SamplingParams(max_tokens=0),
        SamplingParams(stop=[""]),
    ]
    for p in bad:
        with pytest.raises(ValueError):
            eng.add_request("x", PROMPT, p)
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request("x", list(range(1, 40)), SamplingParams())
    with pytest.raises(ValueError):
        eng.add_request("x", [], SamplingParams())
    with pytest.raises(ValueError):
        eng.add_request("x", [10**6], SamplingParams())
    with pytest.raises(UnknownAdapterError) as exc:
        eng.add_request("x", PROMPT, SamplingParams(), "nope")
    assert isinstance(exc.value, KeyError) and "nope" in str(exc.value)
    eng.add_request("dup", PROMPT, SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("dup", PROMPT, SamplingParams())
    assert eng.stats().num_waiting == 1
    # a request reaching max_model_len stops with "length"
    out = _run(eng)["dup"]
    assert out.finish_reason == "length"
    long = eng.generate([list(range(1, 30))], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert long.finish_reason == "length" and 29 + len(long.output_token_ids) == 32


def test_abort_frees_blocks_immediately_and_reports(make_engine):
    eng = make_engine()
    eng.add_request("a", PROMPT * 3, SamplingParams(max_tokens=50, ignore_eos=True))
    eng.add_request("b", PROMPT, SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    used = eng.stats().kv_blocks_used
    assert used > 0
    eng.abort_request("a")
    assert eng.stats().kv_blocks_used < used and eng.stats().num_running == 1
    eng.abort_request("a")  # idempotent
    eng.abort_request("unknown")  # no error
    outs = eng.step()
    ab = [o for o in outs if o.request_id == "a"]
    assert len(ab) == 1 and ab[0].finished and ab[0].finish_reason == "abort"
    eng.abort_request("b")
    eng.step()
    assert eng.stats().kv_blocks_used == 0 and not eng.has_unfinished_requests()


def test_plugin_step_infos_and_stats(make_engine, adapters):
    eng = make_engine(max_num_batched_tokens=32, max_loras=2)
    eng.load_adapter("ad-r4", str(adapters["ad-r4"]))
    log = StepLog()
    eng.add_plugin(log)
    seen = log.infos
    eng.add_request("a", PROMPT, SamplingParams(max_tokens=3, ignore_eos=True), "ad-r4")
    eng.add_request("b", PROMPT, SamplingParams(max_tokens=3, ignore_eos=True))
    st = eng.stats()
    assert st.num_waiting == 2 and st.waiting_by_adapter == {"ad-r4": 1} and st.max_loras == 2
    eng.step()
    st = eng.stats()
    assert st.num_running == 2 and st.running_by_adapter == {"ad-r4": 1} and st.iteration_tokens == 14
    assert seen[0].num_scheduled_tokens == 14 and seen[0].leftover_tokens == 32 - 14 and seen[0].num_seqs == 2
    assert st.kv_blocks_used == 4 and st.kv_usage == pytest.approx(4 / st.kv_blocks_total)
    assert st.adapters["gpu"] == 1 and st.adapters["slots_pinned"] == 1
    _run(eng)
    assert [i.leftover_tokens for i in seen[1:]] == [30, 30]
    assert seen[1].num_decode_tokens == 2 and seen[0].num_prefill_tokens == 14
    eng.step()  # idle step still reports the whole budget as leftover (training can use it)
    assert seen[-1].leftover_tokens == 32 and seen[-1].num_seqs == 0


def test_kv_budget_bounds_the_context(make_engine):
    eng = make_engine(num_kv_blocks=None, kv_cache_bytes=64 * 1024, block_size=4)  # tiny model: 2 KiB per block
    assert eng.block_manager.num_blocks == 32 and eng.max_model_len == 128  # lowered from the config's 1024
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request("x", list(range(10, 140)), SamplingParams())
    with pytest.raises(ValueError, match="needs more KV cache"):
        make_engine(num_kv_blocks=None, kv_cache_bytes=64 * 1024, block_size=4, max_model_len=512)


def test_penalties_match_their_definitions_and_change_generation(make_engine):
    from lorafleet.worker.engine.sampler import apply_penalties

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    out = apply_penalties(logits, [p], [([4], [3, 3, 1])])[0]
    # token 4 (prompt only): repetition only; 3 (output x2): 3/2 - 0.25*2 - 0.5; 1 (output x1, negative): -1*2 - 0.25 - 0.5
    torch.testing.assert_close(out, torch.tensor([2.0, -2.75, 0.5, 0.5, 0.5]))
    for bad in (dict(presence_penalty=3.0), dict(frequency_penalty=-2.5), dict(repetition_penalty=0.0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad).validate()
    eng = make_engine()
    plain = eng.generate([PROMPT], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].output_token_ids
    strong = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0)
    pen = eng.generate([PROMPT], strong)[0].output_token_ids
    assert pen != plain
    assert max(pen.count(t) for t in set(pen)) <= max(plain.count(t) for t in set(plain))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_plugins_after_launch_runs_before_the_steps_tokens_reach_the_host(make_engine, adapters, async_scheduling):
    """A plugin's `after_launch` sees each step (same info as `after_step`) after its forward is queued and before
    its tokens are appended to any sequence; registering one changes no output."""

    def run(with_hook: bool):
        eng = make_engine(max_num_batched_tokens=32, max_loras=2, async_scheduling=async_scheduling)
        eng.load_adapter("ad-r4", str(adapters["ad-r4"]))
        launched = []

        def on_launch(info):
            # this step's tokens are not on the host yet: no sequence has grown since it was scheduled
            launched.append((info, {r: len(s.token_ids) for r, s in eng._requests.items()}))

        log = StepLog(on_launch if with_hook else None)
        ended = log.infos
        if with_hook:
            eng.add_plugin(log)
        eng.add_request("a", PROMPT, SamplingParams(max_tokens=4, ignore_eos=True), "ad-r4")
        eng.add_request("b", PROMPT[:5], SamplingParams(max_tokens=3, ignore_eos=True))
        outs = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                outs.setdefault(o.request_id, []).extend(o.new_token_ids)
        return outs, launched, ended

    plain, none, _ = run(False)
    hooked, launched, ended = run(True)
    assert hooked == plain and not none
    forwards = [i for i in ended if i.num_seqs > 0]
    assert [i.step for i, _ in launched] == [i.step for i in forwards]
    for (li, _), ei in zip(launched, forwards, strict=True):
        assert (li.num_scheduled_tokens, li.num_decode_tokens, li.num_seqs) == (
            ei.num_scheduled_tokens,
            ei.num_decode_tokens,
            ei.num_seqs,
        )
    first, lens = launched[0]
    assert first.num_prefill_tokens == len(PROMPT) + 5 and lens == {"a": len(PROMPT), "b": 5}


def test_graph_buckets_cover_every_step_size():
    """Decode batch sizes and prefill/mixed (tokens, longest query) buckets cover every step the scheduler can make
    (the graph runners pick the smallest bucket that holds a step; eager only beyond the largest)."""
    from lorafleet.worker.engine.cuda_graph import default_sizes, mixed_buckets

    sizes = default_sizes(100)
    assert sizes[:3] == [1, 2, 4] and sizes[-1] == 100 and sizes == sorted(set(sizes))
    b = mixed_buckets(2048)
    assert list(b) == [128, 256, 384, 512, 768, 1024, 1536, 2048]
    for t, qs in b.items():
        assert qs[-1] == t and all(q <= t for q in qs)  # a query never exceeds the step's tokens
    for n in range(1, 2049, 7):
        t = min(t for t in b if t >= n)
        assert t <= max(128, 2 * n) and (n <= 512 or t <= 1.5 * n)  # padding bounded
    assert mixed_buckets(96) == {96: [32, 96]}
    from lorafleet.worker.engine.cuda_graph import mixed_key

    assert mixed_key(b, 64, 300, 10, 200) == (384, 384)  # one 200-token chunk + decodes
    assert mixed_key(b, 64, 300, 60, 20) == (384, 32)  # many short chunks share the short-query graph
    assert mixed_key(b, 64, 2048, 1, 2048) == (2048, 2048)
    assert mixed_key(b, 64, 2049, 1, 1) is None and mixed_key(b, 64, 100, 65, 1) is None  # eager beyond


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_finished_requests_log_their_tpot_once(make_engine, async_scheduling, monkeypatch):
    """Each request that finishes with >= 2 tokens adds one (decode midpoint, TPOT) sample, on the engine's
    monotonic clock: (finish - first token) / (tokens - 1). Co-serving steers by these (training/slo.py)."""
    import itertools

    from lorafleet.worker.engine import llm_engine

    clock = itertools.count(100.0, 0.5)  # every reading of the clock is 0.5 s after the previous one
    monkeypatch.setattr(llm_engine.time, "monotonic", lambda: next(clock))
    eng = make_engine(max_num_batched_tokens=64, async_scheduling=async_scheduling)
    eng.add_request("a", PROMPT, SamplingParams(max_tokens=5, ignore_eos=True))
    eng.add_request("b", PROMPT[:5], SamplingParams(max_tokens=3, ignore_eos=True))
    eng.add_request("one", PROMPT[:4], SamplingParams(max_tokens=1, ignore_eos=True))  # no TPOT: not logged
    while eng.has_unfinished_requests():
        eng.step()
    samples, cursor = eng.request_tpots.since(0)
    assert cursor == 2 and len(samples) == 2
    for mid, tpot in samples:
        assert tpot > 0 and mid >= 100.0
    assert eng.request_tpots.since(cursor) == ([], 2)  # a reader sees every sample once


@pytest.mark.parametrize("dtype", [torch.int32, torch.long])
def test_pad_tables_equals_row_by_row_padding(dtype):
    """The numpy block-table builder (host time per step) against plain per-row padding, empty rows included."""
    from lorafleet.worker.engine.model_runner import _pad_tables

    g = torch.Generator().manual_seed(0)
    width = 12
    tables = [torch.randint(0, 10_000, (int(n),), generator=g).tolist() for n in torch.randint(0, width + 1, (40,))]
    tables[3] = []
    out = _pad_tables(tables, width, dtype)
    ref = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=dtype)
    assert out.dtype == dtype and torch.equal(out, ref)
