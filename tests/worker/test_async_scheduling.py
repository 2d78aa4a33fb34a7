"""Async scheduling (EngineConfig.async_scheduling) against the synchronous engine on the tiny model: the same
workloads (mixed adapters over few slots, stop ids / strings, max_tokens, penalties, seeds, aborts mid-run,
preemption in a small KV cache, chunked prefill, prefix caching) give identical token ids and finish reasons, the
wasted token of a stopped sequence is never emitted, and no KV block or adapter pin leaks."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from lorafleet.worker.engine import model_runner
from lorafleet.worker.engine.sequence import SamplingParams
from lorafleet.worker.testing import StepLog

NAMES = ["ad-r4", "ad-r8", "ad-r16rs", "ad-r2qv", None]


def _assert_clean(eng):
    assert not eng.has_unfinished_requests() and eng._inflight is None
    bm = eng.block_manager
    assert bm.num_free == bm.num_blocks and all(rc == 0 for rc in bm.ref_counts)
    assert eng.store.stats()["slots_pinned"] == 0
    assert all(v.refs == 0 and v.running == 0 for v in eng.store.versions())
    users = Counter(p for v in eng.store.versions() if v.slot is not None for p in v.targets)
    assert +eng.store._proj_users == users


def _prompts(n, seed=0, lo=3, hi=30):
    rng = random.Random(seed)
    return [[rng.randrange(10, 370) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _engine(make_engine, adapters, async_scheduling, **kw):
    eng = make_engine(async_scheduling=async_scheduling, **kw)
    for name in NAMES[:-1]:
        eng.load_adapter(name, str(adapters[name]))
    return eng


def _drive(eng, requests, abort_after=None):
    """Feeds `requests` (id, prompt, params, adapter) two per step, aborts a request once `abort_after[id]` output
    tokens have been *reported* (what a client sees, so both modes abort at the same point of the stream), and
    returns {id: (output ids, finish reason)} plus every IterationInfo."""
    abort_after = dict(abort_after or {})
    log = StepLog()
    eng.add_plugin(log)
    infos = log.infos
    queue = list(requests)
    final = {}
    while queue or eng.has_unfinished_requests():
        for rid, prompt, params, name in queue[:2]:
            eng.add_request(rid, prompt, params, name)
        queue = queue[2:]
        for o in eng.step():
            assert -1 not in o.output_token_ids  # a placeholder never leaks into what a client sees
            if o.finished:
                assert o.request_id not in final
                final[o.request_id] = (o.output_token_ids, o.finish_reason)
            elif o.num_output_tokens >= abort_after.get(o.request_id, 1 << 30):
                eng.abort_request(o.request_id)
                abort_after.pop(o.request_id)
    return final, infos


def _mixed_workload(eng_ref, n=14, seed=3):
    """Requests whose stop ids / strings really trigger: they are read off a greedy reference run."""
    prompts = _prompts(n, seed=seed)
    probe = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)] * n
    ref = {}
    for i, p in enumerate(prompts):
        eng_ref.add_request(f"p{i}", p, probe[i], NAMES[i % len(NAMES)])
    while eng_ref.has_unfinished_requests():
        ref.update({o.request_id: o for o in eng_ref.step() if o.finished})
    reqs = []
    for i, p in enumerate(prompts):
        out = ref[f"p{i}"].output_token_ids
        kind = i % 7
        if kind == 0:
            params = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[out[5]], ignore_eos=True)
        elif kind == 1:
            text = eng_ref.tokenizer.decode(out, skip_special_tokens=True)
            stop = text[len(text) // 3 : len(text) // 3 + 2]
            params = SamplingParams(temperature=0, max_tokens=20, stop=[stop] if stop.strip() else [], ignore_eos=True)
        elif kind == 2:
            params = SamplingParams(temperature=0, max_tokens=1 + i % 3, ignore_eos=True)
        elif kind == 3:
            params = SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.3, frequency_penalty=0.5)
            # no ignore_eos: EOS may stop it
        elif kind == 4:
            params = SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_tokens=14, ignore_eos=True)
        elif kind == 5:
            params = SamplingParams(temperature=0, max_tokens=18, stop_token_ids=[out[0]], ignore_eos=True)
        else:
            params = SamplingParams(temperature=0, max_tokens=22, ignore_eos=True)
        reqs.append((f"r{i}", p, params, NAMES[i % len(NAMES)]))
    return reqs


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_loras=2, max_cpu_loras=8, max_num_batched_tokens=16, num_kv_blocks=16, block_size=4),
        dict(max_loras=4, max_cpu_loras=8, max_num_batched_tokens=64, num_kv_blocks=256, block_size=4),
        dict(max_loras=2, max_cpu_loras=8, max_num_batched_tokens=12, num_kv_blocks=40, enable_prefix_caching=True),
    ],
    ids=["tight_kv_chunked", "roomy", "prefix_cache"],
)
def test_async_matches_sync_on_a_mixed_workload(make_engine, adapters, kw):
    sync = _engine(make_engine, adapters, False, **kw)
    reqs = _mixed_workload(_engine(make_engine, adapters, False, max_loras=4, num_kv_blocks=256))
    if kw.get("enable_prefix_caching"):
        shared = reqs[0][1]
        reqs += [(f"s{i}", shared + [20 + i], SamplingParams(temperature=0, max_tokens=9), None) for i in range(3)]
    abort_after = {"r4": 3, "r6": 1, "r13": 5}
    want, sync_infos = _drive(sync, reqs, abort_after)
    asyn = _engine(make_engine, adapters, True, **kw)
    got, async_infos = _drive(asyn, reqs, abort_after)
    assert got == want
    reasons = Counter(r for _, r in want.values())
    assert reasons["stop"] >= 2 and reasons["length"] >= 4 and reasons["abort"] == 3
    assert [len(want[r][0]) for r in ("r4", "r6", "r13")] == [3, 1, 5]
    assert want["r11"][1] == "length" and len(want["r11"][0]) == 14  # seeded sampling, run to the end
    for eng in (sync, asyn):
        _assert_clean(eng)
    if kw["num_kv_blocks"] <= 16:
        assert sync.scheduler.num_preemptions > 0 and asyn.scheduler.num_preemptions > 0
    if kw["max_num_batched_tokens"] <= 16:  # prompts up to 30 tokens: prefills were chunked
        assert any(i.num_prefill_tokens and i.leftover_tokens == 0 for i in async_infos)
    if kw.get("enable_prefix_caching"):
        assert asyn.block_manager.hit_tokens > 0 and sync.block_manager.hit_tokens > 0


@pytest.mark.parametrize("seed", [11, 12])
def test_async_matches_sync_at_scale(make_engine, adapters, seed):
    """The check before async scheduling became the GPU default: ~100 requests of every kind above (stop ids and
    strings, penalties, seeded sampling, one-token requests) over two adapter slots, a KV cache that preempts, chunked
    prefill and prefix caching, with a random seventh of them aborted at random points of their streams."""
    kw = dict(max_loras=2, max_cpu_loras=8, max_num_batched_tokens=24, num_kv_blocks=48, enable_prefix_caching=True)
    reqs = _mixed_workload(_engine(make_engine, adapters, False, max_loras=4, num_kv_blocks=512), n=98, seed=seed)
    rng = random.Random(seed)
    shared = reqs[1][1]
    reqs += [(f"s{i}", shared + [30 + i], SamplingParams(temperature=0, max_tokens=7), NAMES[1]) for i in range(6)]
    rng.shuffle(reqs)
    abort_after = {rid: rng.randint(1, 6) for rid, *_ in rng.sample(reqs, len(reqs) // 7)}
    want, _ = _drive(_engine(make_engine, adapters, False, **kw), reqs, abort_after)
    asyn = _engine(make_engine, adapters, True, **kw)
    got, _ = _drive(asyn, reqs, abort_after)
    assert got.keys() == want.keys() == {rid for rid, *_ in reqs}
    assert got == want
    reasons = Counter(r for _, r in want.values())
    assert reasons["stop"] >= 25 and reasons["length"] >= 40 and reasons["abort"] >= 7
    assert asyn.scheduler.num_preemptions > 0 and asyn.block_manager.hit_tokens > 0
    _assert_clean(asyn)


def test_stopped_sequences_waste_one_token_and_length_ends_waste_none(make_engine, adapters):
    """Every request admitted at once (no preemption, roomy budget): the async engine schedules exactly one extra
    decode token per request that stopped on a token or string, none for those ending by length."""
    ref = _engine(make_engine, adapters, False)
    prompts = _prompts(6, seed=11)
    names = [NAMES[i % len(NAMES)] for i in range(len(prompts))]
    base = ref.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), names)
    params = [
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[o.output_token_ids[3]], ignore_eos=True)
        if i % 2
        else SamplingParams(temperature=0, max_tokens=4 + i, ignore_eos=True)
        for i, o in enumerate(base)
    ]
    reqs = [(f"q{i}", p, params[i], names[i]) for i, p in enumerate(prompts)]
    runs = {}
    for flag in (False, True):
        eng = _engine(make_engine, adapters, flag, max_num_batched_tokens=512)
        final, infos = _drive(eng, reqs)
        runs[flag] = (final, sum(i.num_scheduled_tokens for i in infos))
        _assert_clean(eng)
    assert runs[True][0] == runs[False][0]
    stopped = sum(r == "stop" for _, r in runs[False][0].values())
    assert stopped == 3
    assert runs[True][1] == runs[False][1] + stopped


def test_preempting_a_sequence_whose_token_is_in_flight(make_engine, adapters, monkeypatch):
    """KV runs out while every sequence decodes: the victim's newest token is still a placeholder; it is settled
    while the sequence waits, and the recomputed sequence continues exactly as the synchronous one does."""
    from lorafleet.worker.engine.model_runner import PLACEHOLDER
    from lorafleet.worker.engine.scheduler import Scheduler

    victims: list[bool] = []
    preempt = Scheduler.preempt

    def spy(self, seq):
        victims.append(seq.token_ids[-1] == PLACEHOLDER)
        return preempt(self, seq)

    monkeypatch.setattr(Scheduler, "preempt", spy)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    reqs = [(f"v{i}", list(range(10 + i, 17 + i)), params, NAMES[i]) for i in range(4)]  # 7 tokens: 2 blocks each
    kw = dict(num_kv_blocks=8, block_size=4, max_num_batched_tokens=64)
    want, _ = _drive(_engine(make_engine, adapters, False, **kw), reqs)
    assert victims and not any(victims)
    victims.clear()
    asyn = _engine(make_engine, adapters, True, **kw)
    got, _ = _drive(asyn, reqs)
    assert got == want and all(r == "length" and len(t) == 12 for t, r in got.values())
    assert any(victims)
    _assert_clean(asyn)


def test_next_step_is_launched_before_the_previous_tokens_reach_the_host(make_engine, adapters, monkeypatch):
    """The overlap itself: in each step the runner launches step N (its decode inputs read from N-1's device
    tokens) before N-1's tokens are copied out, and outputs arrive one step later than synchronously."""
    eng = _engine(make_engine, adapters, True)
    events = []
    launch, tolist = eng.runner.launch, model_runner.SampledTokens.tolist

    def spy_launch(batch, pending=None):
        events.append(("launch", pending is not None))
        return launch(batch, pending)

    def spy_tolist(self):
        events.append(("settle", len(self.seqs)))
        return tolist(self)

    monkeypatch.setattr(eng.runner, "launch", spy_launch)
    monkeypatch.setattr(model_runner.SampledTokens, "tolist", spy_tolist)
    eng.add_request("a", [12, 40, 77, 301], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), "ad-r4")
    eng.add_request("b", [5, 64, 200], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert eng.step() == []  # prefill launched, nothing settled yet
    outs = eng.step()
    assert [o.num_output_tokens for o in outs] == [1, 1]
    assert events == [("launch", False), ("launch", True), ("settle", 2)]
    outs = eng.step()  # launch 3rd token; both end by length, so nothing is left to launch after this one
    outs += eng.step()
    assert all(o.finished and o.num_output_tokens == 3 for o in outs[-2:])
    assert [e for e in events if e[0] == "launch"] == [("launch", False)] + [("launch", True)] * 2
    assert not eng.has_unfinished_requests()
    _assert_clean(eng)


def test_async_flag_can_be_switched_between_steps(make_engine, adapters):
    prompts = _prompts(4, seed=5)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    ref = _engine(make_engine, adapters, False)
    want = [o.output_token_ids for o in ref.generate(prompts, params, NAMES[:4])]
    eng = _engine(make_engine, adapters, True)
    for i, p in enumerate(prompts):
        eng.add_request(f"x{i}", p, params, NAMES[i])
    final = {}
    for k in range(200):
        eng.config.async_scheduling = k % 3 != 0
        final.update({o.request_id: o.output_token_ids for o in eng.step() if o.finished})
        if not eng.has_unfinished_requests():
            break
    assert [final[f"x{i}"] for i in range(4)] == want
    _assert_clean(eng)


def test_config_validates_the_flag():
    from lorafleet.worker.config import EngineConfig

    EngineConfig(model="m", async_scheduling=True).validate()
    EngineConfig(model="m", async_scheduling=None).validate()
    assert EngineConfig(model="m").async_scheduling is None
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(model="m", async_scheduling="yes").validate()  # type: ignore[arg-type]


def test_auto_async_scheduling_is_on_for_a_gpu_and_off_on_cpu(make_engine):
    from lorafleet.worker.config import resolve_async_scheduling

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_async_scheduling(None, cuda) is True and resolve_async_scheduling(None, cpu) is False
    assert resolve_async_scheduling(False, cuda) is False and resolve_async_scheduling(True, cpu) is True
    eng = make_engine(
        async_scheduling=None
    )  # auto on this CPU: the engine's copy is resolved, the caller's config is not touched
    assert eng.device.type == "cpu" and eng.config.async_scheduling is False
    forced = make_engine(async_scheduling=True)
    assert forced.config.async_scheduling is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_async_matches_sync_on_cuda_with_graphs(make_engine, adapters):
    """The device-only paths: decode inputs patched on the GPU, CUDA-graph replay, side-stream copies."""
    kw = dict(device="cuda", dtype="float32", max_num_seqs=16, max_loras=2, max_cpu_loras=8)
    kw.update(max_num_batched_tokens=16, num_kv_blocks=16, block_size=4)
    reqs = _mixed_workload(_engine(make_engine, adapters, False, max_loras=4, device="cuda", dtype="float32"))
    abort_after = {"r4": 3, "r6": 1, "r13": 5}
    sync = _engine(make_engine, adapters, False, **kw)
    asyn = _engine(make_engine, adapters, True, **kw)
    assert asyn.runner.graph_runner is not None
    want, _ = _drive(sync, reqs, abort_after)
    got, _ = _drive(asyn, reqs, abort_after)
    assert got == want
    for eng in (sync, asyn):
        _assert_clean(eng)
