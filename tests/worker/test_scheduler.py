"""Scheduler behaviour end to end on the tiny model: preemption by recompute, chunked prefill equivalence,
many concurrent mixed-adapter streams with aborts, and no leaked KV blocks or adapter pins afterwards."""

from __future__ import annotations

import random
from collections import Counter

import torch
from lorafleet.worker.engine.sequence import SamplingParams
from lorafleet.worker.testing import StepLog

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _assert_clean(eng):
    assert not eng.has_unfinished_requests()
    assert eng.block_manager.num_free == eng.block_manager.num_blocks
    assert all(rc == 0 for rc in eng.block_manager.ref_counts)
    assert eng.store.stats()["slots_pinned"] == 0
    assert all(v.refs == 0 and v.running == 0 for v in eng.store.versions())
    resident = [v for v in eng.store.versions() if v.slot is not None]
    users = Counter(p for v in resident for p in v.targets)
    assert +eng.store._proj_users == users  # slot bookkeeping matches what is resident


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(10, 370) for _ in range(rng.randint(3, 15))] for _ in range(n)]


def test_preemption_requeues_and_outputs_match_unconstrained(make_engine):
    prompts = _prompts(6, seed=1)
    free = make_engine(num_kv_blocks=256).generate(prompts, GREEDY)
    tight = make_engine(num_kv_blocks=14, block_size=4)  # 6 sequences of up to 27 tokens need ~40 blocks
    outs = tight.generate(prompts, GREEDY)
    assert tight.scheduler.num_preemptions > 0
    assert [o.output_token_ids for o in outs] == [o.output_token_ids for o in free]
    assert all(o.finish_reason == "length" for o in outs)
    _assert_clean(tight)


def test_preempted_sequence_goes_to_front_of_queue(make_engine):
    eng = make_engine(num_kv_blocks=6, block_size=4, max_num_batched_tokens=64)
    for i in range(3):
        eng.add_request(f"r{i}", list(range(10 + i, 17 + i)), GREEDY)  # 7 tokens = 2 blocks each
    eng.step()  # all three admitted (6 blocks)
    assert len(eng.scheduler.running) == 3
    eng.step()  # 8 tokens: still 2 blocks each
    batch = eng.scheduler.schedule()  # 9th token needs a 3rd block: newest (r2) is preempted
    assert [s.request_id for s in batch.preempted] == ["r2"]
    assert eng.scheduler.waiting[0].request_id == "r2" and eng.scheduler.waiting[0].num_computed_tokens == 0


def _first_logits(eng, prompt, budget):
    eng.add_request("x", prompt, SamplingParams(temperature=0, max_tokens=1))
    steps = 0
    while True:
        batch = eng.scheduler.schedule()
        assert batch.total_tokens <= budget
        seqs, logits = eng.runner.logits_for(batch)
        for s, n in zip(batch.seqs, batch.num_tokens, strict=True):
            s.num_computed_tokens += n
        steps += 1
        if seqs:
            eng.abort_request("x")
            return logits[0], steps


def test_chunked_prefill_gives_same_logits_and_tokens(make_engine):
    prompt = _prompts(1, seed=4)[0] * 2 + [42] * 9  # 20+ tokens
    results = {}
    for budget in (3, 7, 4096):
        eng = make_engine(max_num_batched_tokens=budget)
        logits, steps = _first_logits(eng, prompt, budget)
        assert steps == -(-len(prompt) // budget)
        results[budget] = (logits, eng.generate([prompt], GREEDY)[0].output_token_ids)
        _assert_clean(eng)
    for budget in (3, 7):
        torch.testing.assert_close(results[budget][0], results[4096][0], atol=1e-4, rtol=0)
        assert results[budget][1] == results[4096][1]


def test_decode_first_then_prefill_chunks_under_budget(make_engine):
    eng = make_engine(max_num_batched_tokens=8)
    eng.add_request("a", list(range(20, 26)), GREEDY)
    eng.step()  # a: 6 prefill tokens
    eng.add_request("b", list(range(30, 50)), GREEDY)
    batch = eng.scheduler.schedule()
    assert [s.request_id for s in batch.seqs] == ["a", "b"] and batch.num_tokens == [1, 7]


def test_many_streams_mixed_adapters_and_aborts(make_engine, adapters):
    names = [None, "ad-r4", "ad-r8", "ad-r16rs", "ad-r2qv"]
    prompts = _prompts(24, seed=7)
    choice = [names[i % len(names)] for i in range(len(prompts))]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    # reference: each request alone on a roomy engine
    ref_eng = make_engine(max_loras=8)
    for n in names[1:]:
        ref_eng.load_adapter(n, str(adapters[n]))
    refs = [ref_eng.generate([p], params, [a])[0].output_token_ids for p, a in zip(prompts, choice, strict=True)]
    # stressed: 2 GPU slots for 4 adapters, few KV blocks, small budget, aborts mid-flight
    eng = make_engine(max_loras=2, max_cpu_loras=4, num_kv_blocks=30, max_num_seqs=6, max_num_batched_tokens=16)
    for n in names[1:]:
        eng.load_adapter(n, str(adapters[n]))
    for i, (p, a) in enumerate(zip(prompts, choice, strict=True)):
        eng.add_request(f"r{i}", p, params, a)
    aborted = {"r3", "r10", "r17", "r22"}
    final, step = {}, 0
    while eng.has_unfinished_requests():
        step += 1
        if step == 4:
            for rid in aborted:
                eng.abort_request(rid)
        st = eng.stats()
        assert st.num_running <= 6 and st.adapters["slots_pinned"] <= 2
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
        assert step < 2000
    for i in range(len(prompts)):
        o = final[f"r{i}"]
        if f"r{i}" in aborted:
            assert o.finish_reason == "abort"
        else:
            assert o.finish_reason == "length" and o.output_token_ids == refs[i], i
            assert o.lora_name == choice[i]
    assert eng.store.counters["slot_evictions"] > 0
    _assert_clean(eng)


def test_prefix_caching_skips_shared_prompt_blocks_with_identical_outputs(make_engine, adapters):
    system = _prompts(1, seed=9)[0] * 4  # a long shared "system prompt"
    prompts = [system + [20 + i, 30 + i, 40 + i] for i in range(4)]
    names = [None, "ad-r4", None, "ad-r4"]
    ref = make_engine(block_size=4)
    ref.load_adapter("ad-r4", str(adapters["ad-r4"]))
    expect = [o.output_token_ids for o in ref.generate(prompts, GREEDY, names)]
    eng = make_engine(block_size=4, enable_prefix_caching=True, num_kv_blocks=64)
    eng.load_adapter("ad-r4", str(adapters["ad-r4"]))
    first = eng.generate(prompts[:2], GREEDY, names[:2])  # fills the cache for base and for ad-r4
    assert eng.stats().prefix_cache_hit_tokens == 0
    log = StepLog()
    eng.add_plugin(log)
    seen = log.infos
    rest = eng.generate(prompts[2:], GREEDY, names[2:])
    reused = (len(system) + 2) // 4 * 4
    assert eng.stats().prefix_cache_hit_tokens == 2 * reused
    assert seen[0].num_scheduled_tokens == sum(len(p) for p in prompts[2:]) - 2 * reused
    assert [o.output_token_ids for o in first + rest] == expect
    _assert_clean(eng)
    # a tiny cache under pressure: still correct, nothing leaked
    small = make_engine(block_size=4, enable_prefix_caching=True, num_kv_blocks=20, max_num_seqs=2)
    small.load_adapter("ad-r4", str(adapters["ad-r4"]))
    assert [o.output_token_ids for o in small.generate(prompts, GREEDY, names)] == expect
    _assert_clean(small)


def test_cold_adapter_is_not_starved_by_a_hot_one(make_engine, adapters):
    eng = make_engine(max_loras=1, max_num_seqs=4)
    for n in ("ad-r4", "ad-r8"):
        eng.load_adapter(n, str(adapters[n]))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    eng.add_request("hot0", [11, 12, 13], params, "ad-r4")
    eng.step()
    eng.add_request("cold", [14, 15, 16], params, "ad-r8")
    done, k = {}, 1
    for _ in range(200):  # a continuous stream of hot requests keeps ad-r4's only slot pinned
        if "cold" not in done:
            eng.add_request(f"hot{k}", [11, 12, 13 + k % 50], params, "ad-r4")
            eng.add_request(f"base{k}", [21, 22, 23 + k % 50], params)
            k += 1
        done.update({o.request_id: o for o in eng.step() if o.finished})
        if "cold" in done:
            break
    assert done["cold"].finish_reason == "length" and done["cold"].lora_name == "ad-r8"
    assert any(r.startswith("base") for r in done)  # base requests kept flowing meanwhile
    for s in list(eng.scheduler.running) + list(eng.scheduler.waiting):
        eng.abort_request(s.request_id)
    eng.step()
    _assert_clean(eng)
