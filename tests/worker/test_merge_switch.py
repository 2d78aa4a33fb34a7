"""dLoRA's merged/unmerged switching: the merged path serves the same tokens, unmerge gives back the base exactly,
switching under concurrent streams never mixes adapters or versions, and the credit policy does not flap.

Float bounds are derived from the sizes: a dot product of n fp32 terms computed in any order is within
gamma_n * sum|terms| of the exact value (gamma_n = n*u / (1 - n*u), u = 2^-24), whatever the CPU or thread count.
"""

from __future__ import annotations

import hashlib
import math
import random

import pytest
import torch
from lorafleet.worker.engine.merge_switch import batch_mix
from lorafleet.worker.engine.sequence import SamplingParams
from lorafleet.worker.engine.step_inputs import StepInputs
from lorafleet.worker.layers.lora_context import MergedLoRAContext, SegmentLoRAContext
from lorafleet.worker.lora.merge_policy import BatchMix, CostModel, PolicyState, decide

U = 2.0**-24
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
NEVER = CostModel(row_s=0.0, segment_s=0.0, pass_s=0.0, merge_s=math.inf)  # a mode once set is kept


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def _engine(make_engine, adapters, merge: bool, names=("ad-r4", "ad-r8", "ad-r2qv", "ad-r16rs")):
    eng = make_engine(merge_switch=merge)
    for n in names:
        eng.load_adapter(n, str(adapters[n]))
    return eng


def _weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


PROMPTS = [[5 + i, 17, 9 + 2 * i, 30, 41 + i] for i in range(9)]
NAMES = ["ad-r4"] * 5 + ["ad-r8", "ad-r2qv", None, "ad-r16rs"]  # ad-r4 dominates, 3 others and the base beside it


# ---- one projection: merged vs unmerged within the derived fp32 bound ---------------------------------------------
def test_merged_projection_equals_unmerged_within_fp32_bound(make_engine, adapters):
    eng = _engine(make_engine, adapters, merge=True)
    store, ms = eng.store, eng.runner.merge_switch
    avs = {n: store.current(n) for n in ("ad-r4", "ad-r8", "ad-r2qv")}
    for av in avs.values():
        store.ensure_slot(av)
    dom = avs["ad-r4"]
    ms.hold(dom)
    # rows: 4 of the merged adapter first, then 2 without adapter, 3 of ad-r8, 2 of ad-r2qv (the merged order)
    slots = [dom.slot, -1, avs["ad-r8"].slot, avs["ad-r2qv"].slot]
    indptr = torch.tensor([0, 4, 6, 9, 11], dtype=torch.int32)
    gen = torch.Generator().manual_seed(3)
    layer, proj = 1, "q_proj"
    mod = eng.model.model.layers[layer].self_attn.q_proj
    x = torch.randn(11, mod.in_features, generator=gen)
    unmerged = SegmentLoRAContext(store, indptr, torch.tensor(slots, dtype=torch.int32))
    y_ref = mod(x, unmerged)
    own = torch.tensor([-1, *slots[1:]], dtype=torch.int32)
    w = ms.weights
    merged = MergedLoRAContext(
        w.by_key,
        store,
        w.neg_scales,
        indptr,
        own,
        torch.tensor([0, 4, 11], dtype=torch.int32),
        torch.tensor([-1, dom.slot], dtype=torch.int32),
        own=True,
        neg=True,
        targets=w.merged_targets,
    )
    y = mod(x, merged)
    # bound: every path is dot products over at most K + 2r + 2 terms; sum of |terms| over W, both adapters' deltas
    a_all, b_all = store.stacked(layer, proj, always=True)
    mag = x.abs() @ mod.weight.abs().t()
    for av in avs.values():
        s = abs(av.scale)
        mag = mag + s * ((x.abs() @ a_all[av.slot].abs().t()) @ b_all[av.slot].abs().t())
    n = mod.in_features + 2 * store.max_rank + 2
    bound = 4 * gamma(n) * mag
    diff = (y - y_ref).abs()
    assert torch.all(diff <= bound), float((diff - bound).max())
    # the merged buffer is not the base (the merge did something) and the base GEMM alone is off by the delta
    assert not torch.equal(w.by_key[(layer, proj)], mod.weight)
    assert (mod(x) - y_ref)[:4].abs().max() > 100 * bound[:4].max()


# ---- whole model: logits within bound, tokens exactly ------------------------------------------------------------
def test_merged_tokens_equal_unmerged_tokens_and_logits_within_bound(make_engine, adapters):
    base = _engine(make_engine, adapters, merge=False)
    merged = _engine(make_engine, adapters, merge=True)
    ms = merged.runner.merge_switch
    dom = merged.store.current("ad-r4")
    merged.store.ensure_slot(dom)
    ms.hold(dom)
    ref = base.generate(PROMPTS, GREEDY, NAMES)
    out = merged.generate(PROMPTS, GREEDY, NAMES)
    assert [o.output_token_ids for o in out] == [o.output_token_ids for o in ref]
    assert ms.counters["merged_steps"] == ms.counters["steps"] > 0
    # logits of one prefill step of the mixed batch: the runner's own path, both engines
    la = _prefill_logits(base)
    lb = _prefill_logits(merged)
    s = merged.model.shape
    k = max(s.hidden_size, s.intermediate_size) + 2 * merged.store.max_rank + 2
    # per layer two residual blocks, each at most a few dot products deep; the bound grows with depth and size
    bound = 16 * (2 * s.num_layers + 1) * gamma(k) * (la.abs().max().item() + 1.0)
    assert (la - lb).abs().max().item() <= bound
    assert bound < 1e-2  # still far below what a wrong delta changes (checked next)
    wrong = _prefill_logits(merged, names=["ad-r8"] + NAMES[1:])
    assert (wrong - la).abs().max().item() > 100 * bound


def _prefill_logits(eng, names=NAMES) -> torch.Tensor:
    ids = [f"l{i}-{eng._step}" for i in range(len(PROMPTS))]
    for rid, p, n in zip(ids, PROMPTS, names, strict=True):
        eng.add_request(rid, p, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), n)
    batch = eng.scheduler.schedule()
    assert len(batch.seqs) == len(PROMPTS) and all(n == len(PROMPTS[0]) for n in batch.num_tokens)
    seqs, logits = eng.runner.logits_for(batch)
    for seq in batch.seqs:
        eng.abort_request(seq.request_id)
    eng.step()
    order = {s.request_id: i for i, s in enumerate(seqs)}
    return logits[[order[r] for r in ids]]


# ---- unmerge restores the base bit-exactly ---------------------------------------------------------------------
def test_unmerge_restores_base_weights_and_outputs_bit_exactly(make_engine, adapters):
    eng = _engine(make_engine, adapters, merge=True)
    ms = eng.runner.merge_switch
    before = _weights_digest(eng.model)
    logits0 = _prefill_logits(eng)
    for name in ("ad-r4", "ad-r2qv", "ad-r16rs", "ad-r8"):
        av = eng.store.current(name)
        eng.store.ensure_slot(av)
        ms.hold(av)
        _prefill_logits(eng)  # a merged step ran
        assert ms.merged is av
    ms.hold(None)
    assert _weights_digest(eng.model) == before  # the base parameters were never written
    assert torch.equal(_prefill_logits(eng), logits0)  # and unmerged serving reads them: the same bits
    assert all(v.running == 0 for v in eng.store.versions())  # every merge pin was given back


def test_partial_targets_keep_other_projections_equal_to_base(make_engine, adapters):
    eng = _engine(make_engine, adapters, merge=True)
    w = eng.runner.merge_switch.weights
    for name in ("ad-r8", "ad-r2qv"):  # all projections, then q/v only: k, o, mlp buffers must be the base again
        av = eng.store.current(name)
        eng.store.ensure_slot(av)
        eng.runner.merge_switch.hold(av)
    for e in w.entries:
        same = torch.equal(e.buf, e.base)
        assert same == (e.name not in ("q_proj", "v_proj")), e.name


# ---- inputs of a merged step -------------------------------------------------------------------------------------
def test_merged_step_inputs_put_the_merged_rows_first(make_engine, adapters):
    eng = _engine(make_engine, adapters, merge=False)
    for i, (p, n) in enumerate(zip(PROMPTS, NAMES, strict=True)):
        eng.add_request(f"s{i}", p, GREEDY, n)
    batch = eng.scheduler.schedule()
    dom = eng.store.current("ad-r4").slot
    inp = StepInputs(batch.seqs, batch.num_tokens, eng.config.block_size, eng.device, merged_slot=dom)
    k = len(PROMPTS[0])
    assert [batch.seqs[i].slot for i in inp.order[:5]] == [dom] * 5
    assert inp.seg_slot_list[0] == -1 and dom not in inp.seg_slot_list
    assert inp.neg_indptr.tolist() == [0, 5 * k, 9 * k] and inp.neg_slots.tolist() == [-1, dom]
    assert inp.needs_neg and inp.has_lora and inp.num_unmerged_rows == 4 * k
    assert batch_mix(batch).rows[eng.store.current("ad-r4")] == 5 * k and batch_mix(batch).base_rows == k


# ---- concurrent streams with version switches --------------------------------------------------------------------
def _stream_workload(eng, adapters, spy=None):
    """Waves of requests, mostly on one adapter at a time, the dominant moving between adapters, and ad-r4
    replaced by a new version (other weights) while its requests run. Returns request id -> (version, tokens)."""
    rng = random.Random(7)
    finished: dict[str, tuple[str | None, str | None, list[int]]] = {}
    waves = ["ad-r4", "ad-r8", "ad-r4", None, "ad-r16rs", "ad-r4"]
    n = 0
    for w, dom in enumerate(waves):
        if w == 2:
            eng.load_adapter("ad-r4", str(adapters["ad-r8v2"]), version="v2")  # v1 requests still in flight
        for _ in range(6):
            name = dom if rng.random() < 0.8 else rng.choice(["ad-r4", "ad-r8", "ad-r2qv", None])
            p = [rng.randrange(8, 300) for _ in range(rng.randint(3, 9))]
            eng.add_request(f"q{n}", p, SamplingParams(temperature=0.0, max_tokens=rng.randint(3, 12)), name)
            n += 1
        for _ in range(3):
            for o in eng.step():
                if o.finished:
                    finished[o.request_id] = (o.lora_name, o.lora_version, o.output_token_ids)
            if spy is not None:
                spy(eng)
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                finished[o.request_id] = (o.lora_name, o.lora_version, o.output_token_ids)
    return finished


def test_switching_under_concurrent_streams_never_mixes_adapters_or_versions(make_engine, adapters):
    ref = _stream_workload(_engine(make_engine, adapters, merge=False), adapters)
    eng = _engine(make_engine, adapters, merge=True)
    ms = eng.runner.merge_switch
    ms.cost = CostModel(row_s=1e-3, segment_s=1e-3, pass_s=0.0, merge_s=1e-9)  # switch at the first advantage
    merges = []
    real_merge = ms.weights.merge

    def checked_merge(av):
        in_flight = [v for v in eng.store.versions() if v.name == av.name and v.refs > 0 and v is not av]
        assert not in_flight, f"merged {av.name}@{av.version} while {in_flight[0].version} is in flight"
        merges.append((av.name, av.version))
        real_merge(av)

    ms.weights.merge = checked_merge  # MergeSwitch merges through its weights: the spy sees every merge

    def keep_cost(e):  # a merge replaces merge_s by its measured time; keep the eager test policy
        ms.cost = CostModel(row_s=1e-3, segment_s=1e-3, pass_s=0.0, merge_s=1e-9)

    got = _stream_workload(eng, adapters, spy=keep_cost)
    assert got == ref  # every request: same adapter, same version, same tokens as without switching
    versions = {(n, v) for n, v, _ in ref.values() if n == "ad-r4"}
    assert len(versions) == 2  # both versions of ad-r4 served ...
    v1 = [t for n, v, t in ref.values() if n == "ad-r4" and v != "v2"]
    assert v1, "no request stayed on the first version"
    assert len(merges) >= 3 and len({m for m in merges}) >= 2  # ... while switching between adapters
    assert ("ad-r4", "v2") in merges and ms.counters["merged_steps"] > 0
    assert ms.counters["unmerge"] + ms.counters["forced"] + len(merges) >= 4
    assert all(v.running == 0 for v in eng.store.versions() if v is not ms.merged)


# ---- the policy (pure) -----------------------------------------------------------------------------------------
COST = CostModel(row_s=1.0, segment_s=2.0, pass_s=1.0, merge_s=50.0)
ADS = [f"a{i}" for i in range(32)]


def _run(seq, mergeable=None, cost=COST, state=None):
    state = state or PolicyState()
    modes = []
    for mix in seq:
        d = decide(state, mix, cost, mergeable if mergeable is not None else set(ADS))
        state = d.state
        modes.append(d.merged)
    return modes


def test_policy_merges_a_steady_dominant_once_credits_pay_for_a_round_trip():
    mix = BatchMix({"a0": 90, "a1": 5, "a2": 5}, base_rows=0)
    gain = COST.unmerged(mix) - COST.merged(mix, "a0")
    assert gain > 0
    modes = _run([mix] * 40)
    first = modes.index("a0")
    assert first == math.ceil(COST.merge_s / gain) - 1  # credits after step i: (i + 1) * gain
    assert modes[first:] == ["a0"] * (40 - first)  # and it stays


def test_policy_keeps_a_merge_through_a_short_dip_and_leaves_on_a_sustained_one():
    cost = CostModel(row_s=1.0, segment_s=2.0, pass_s=1.0, merge_s=200.0)
    skew = BatchMix({"a0": 90, "a1": 10})
    dip = BatchMix({"a0": 30, "a1": 35, "a2": 35})  # nobody dominates: merged a0 loses 41 a step
    loss = cost.merged(dip, "a0") - cost.unmerged(dip)
    assert 2 * loss < cost.merge_s and cost.merged(dip, "a1") > cost.unmerged(dip)
    modes = _run([skew] * 10 + [dip] * 2 + [skew] * 5, cost=cost)
    assert modes[9:] == ["a0"] * 8
    modes = _run([skew] * 10 + [dip] * 30, cost=cost)
    left = modes.index(None, 10)
    assert left == 10 + math.ceil(cost.merge_s / loss) - 1 and set(modes[left:]) == {None}


def test_policy_never_merges_when_the_dominant_alternates_or_the_load_is_spread():
    a = BatchMix({"a0": 70, "a1": 30})
    b = BatchMix({"a1": 70, "a0": 30})
    assert set(_run([a, b] * 50)) == {None}
    spread = BatchMix({n: 3 for n in ADS})
    assert set(_run([spread] * 100)) == {None}
    assert COST.merged(spread, "a0") > COST.unmerged(spread)


def test_policy_moves_the_merge_to_a_new_dominant_and_respects_mergeable_and_force():
    modes = _run([BatchMix({"a0": 95, "a1": 5})] * 10 + [BatchMix({"a1": 95, "a0": 5})] * 20)
    assert modes[9] == "a0" and modes[-1] == "a1"
    assert None not in modes[9:]  # straight from a0 to a1
    skew = BatchMix({"a0": 95, "a1": 5})
    assert set(_run([skew] * 50, mergeable={"a1"})) == {None}
    d = decide(PolicyState("a0", {}), skew, COST, set(ADS), force_unmerge=True)
    assert d.switched and d.merged is None and d.reason == "forced"


def test_policy_pure_merged_batch_costs_nothing_and_mixed_rows_pay_twice():
    pure = BatchMix({"a0": 64})
    assert COST.merged(pure, "a0") == 0.0 and COST.unmerged(pure) == 64 + 2 + 1
    mixed = BatchMix({"a0": 10, "a1": 10}, base_rows=4)
    # a1: own pass (10 rows, 1 segment) + subtracting pass over a1's and the base rows (14 rows, 1 segment)
    assert COST.merged(mixed, "a0") == (10 + 2 + 1) + (14 + 2 + 1)


@pytest.mark.parametrize("seed", range(5))
def test_policy_switch_count_is_bounded_by_the_credit_it_earned(seed):
    """Every switch needs credit >= a round trip, and credit only grows by what the current mode lost against an
    alternative: switches <= sum over steps of max(0, cost(current) - cost(best other)) / round trip."""
    rng = random.Random(seed)
    state = PolicyState()
    switches, earned = 0, 0.0
    for _ in range(500):
        dom = rng.choice(ADS[:3])
        rows = {dom: rng.randint(20, 80)}
        for n in rng.sample(ADS, 5):
            rows[n] = rows.get(n, 0) + rng.randint(1, 20)
        mix = BatchMix(rows, rng.randint(0, 10))
        now = COST.step(mix, state.merged)
        alts = [m for m in [None, mix.top(set(ADS))] if m != state.merged]
        earned += max(0.0, max(now - COST.step(mix, m) for m in alts))
        d = decide(state, mix, COST, set(ADS))
        switches += d.switched
        state = d.state
    assert switches <= earned / (COST.merge_s + COST.unmerge_s) + 1e-9


def test_cpu_costs_are_timed_at_start_and_the_merge_time_after_a_merge(make_engine, adapters):
    eng = _engine(make_engine, adapters, merge=True)
    ms = eng.runner.merge_switch
    c = ms.cost
    assert all(math.isfinite(v) and v >= 0 for v in (c.row_s, c.segment_s, c.pass_s, c.merge_s)) and c.pass_s > 0
    av = eng.store.current("ad-r8")
    eng.store.ensure_slot(av)
    ms.hold(av)
    assert ms.cost.merge_s != c.merge_s and ms.cost.pass_s == c.pass_s


def test_projections_that_ignore_the_merged_weight_are_refused(make_engine):
    from lorafleet.worker.layers.linear import LoRALinear
    from lorafleet.worker.lora.merged import MergedWeights

    class OwnForward(LoRALinear):  # e.g. a tensor-parallel shard: it would serve W in a merged step
        def forward(self, x, lora=None):
            return super().forward(x, None)

    eng = make_engine()
    eng.model.model.layers[0].mlp.down_proj.__class__ = OwnForward
    with pytest.raises(ValueError, match="does not support OwnForward"):
        MergedWeights(eng.model, eng.store)


def test_worker_flag_turns_merge_switching_on_and_it_defaults_off(tmp_path):
    from lorafleet.worker.main import build_parser, engine_config

    assert engine_config(build_parser().parse_args(["--model", str(tmp_path)])).merge_switch is False
    assert engine_config(build_parser().parse_args(["--model", str(tmp_path), "--merge-switch"])).merge_switch


# ---- GPU (skipped on CPU machines): the merged graph sets give the tokens of the unmerged engine --------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("eager", [True, False])
def test_gpu_merged_steps_equal_unmerged_tokens(make_engine, adapters, eager):
    """fp32 on the GPU (TF32 dots in the Triton kernels): greedy tokens of a tiny model are far from ties, so the
    merged engine (held merged, then switching by the policy) must give the unmerged engine's tokens."""
    kw = dict(device="cuda", dtype="float32", enforce_eager=eager, max_num_seqs=16, block_size=16)
    base = make_engine(**kw)
    merged = make_engine(merge_switch=True, **kw)
    for eng in (base, merged):
        for n in ("ad-r4", "ad-r8", "ad-r2qv", "ad-r16rs"):
            eng.load_adapter(n, str(adapters[n]))
    if not eager:
        assert {"merged", "merged_lora"} <= set(merged.runner.decode_graphs)
    ms = merged.runner.merge_switch
    dom = merged.store.current("ad-r4")
    merged.store.ensure_slot(dom)
    ms.hold(dom)
    pure = [PROMPTS[0], PROMPTS[1]]
    for prompts, names in ((PROMPTS, NAMES), (pure, ["ad-r4", "ad-r4"])):
        ref = [o.output_token_ids for o in base.generate(prompts, GREEDY, names)]
        assert [o.output_token_ids for o in merged.generate(prompts, GREEDY, names)] == ref
    ms.release()
    ref = _stream_workload(base, adapters)
    ms.cost = CostModel(row_s=1e-3, segment_s=1e-3, pass_s=0.0, merge_s=1e-9)
    assert _stream_workload(merged, adapters) == ref
