"""Adapter store: LRU over few GPU slots, host-tier eviction, refusal of bad adapters (engine keeps serving),
allowed roots/schemes, and version switches that keep in-flight requests on their version."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from lorafleet.worker.engine.sequence import SamplingParams
from lorafleet.worker.lora.adapter import AdapterError, UnknownAdapterError

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPT = [5, 17, 99, 230, 41, 7]


def _still_serving(eng, lora=None):
    out = eng.generate([PROMPT], GREEDY, [lora])[0]
    assert out.finish_reason == "length" and len(out.output_token_ids) == 10


def test_lru_eviction_over_two_slots(make_engine, adapters):
    eng = make_engine(max_loras=2)
    st = eng.store
    a, b, c = (eng.load_adapter(n, str(adapters[n])) for n in ("ad-r4", "ad-r8", "ad-r16rs"))
    assert {a.tier, b.tier, c.tier} == {"host"}
    assert st.ensure_slot(a) == 0 and st.ensure_slot(b) == 1
    st.ensure_slot(a)  # touch a: b is now least recently used
    assert st.ensure_slot(c) == 1 and b.tier == "host" and c.tier == "gpu"
    assert st.counters["slot_evictions"] == 1
    st.pin(a)
    st.pin(c)
    assert st.ensure_slot(b) is None  # every slot pinned by a running sequence: never evicted
    st.unpin(a)
    assert st.ensure_slot(b) == 0 and a.tier == "host"
    # the reused slot holds b's weights, zero-padded beyond its rank
    la, lb = st.stacked(0, "q_proj")
    wa, wb = b.weights.weights[(0, "q_proj")]
    assert torch.equal(la[0, : b.rank], wa) and not la[0, b.rank :].any() and torch.equal(lb[0, :, : b.rank], wb)
    assert st.scales[0].item() == pytest.approx(b.scale)
    st.unpin(c)


def test_host_tier_evicts_and_reloads_from_disk(make_engine, adapters, hf_greedy):
    eng = make_engine(max_loras=1, max_cpu_loras=2)
    for n in ("ad-r4", "ad-r8", "ad-r16rs", "ad-r2qv"):
        eng.load_adapter(n, str(adapters[n]))
    assert eng.store.counters["host_evictions"] >= 2
    assert eng.store.current("ad-r4").tier == "disk"
    out = eng.generate([PROMPT], GREEDY, ["ad-r4"])[0]
    assert out.output_token_ids == hf_greedy(PROMPT, 10, "ad-r4")


def _pickle_bomb_adapter(src, dst, marker):
    class Bomb:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    dst.mkdir()
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    (dst / "adapter_model.bin").write_bytes(pickle.dumps({"x": Bomb()}))


def test_bad_adapters_are_refused_and_engine_keeps_serving(make_engine, adapters, adapter_root, tmp_path):
    from lorafleet.worker.testing import TinyLlamaSpec, build_peft_adapter, build_tiny_llama

    root = tmp_path / "root"
    root.mkdir()
    eng = make_engine(max_lora_rank=8, adapter_roots=[str(adapter_root), str(root)])
    eng.load_adapter("good", str(adapters["ad-r4"]))
    other = build_tiny_llama(tmp_path / "other", TinyLlamaSpec(hidden_size=32, intermediate_size=64))
    build_peft_adapter(root / "wrong_shape", other, rank=4)
    marker = tmp_path / "PWNED"
    _pickle_bomb_adapter(adapters["ad-r4"], root / "pickled", marker)
    outside = tmp_path / "outside"
    shutil.copytree(adapters["ad-r4"], outside)
    (root / "escape").symlink_to(outside)  # inside the root, pointing outside it
    bad_cfg = root / "dora"
    shutil.copytree(adapters["ad-r4"], bad_cfg)
    cfg = json.loads((bad_cfg / "adapter_config.json").read_text())
    (bad_cfg / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    cases = {
        str(root / "wrong_shape"): "do not fit the base model",
        str(adapters["ad-r16rs"]): "exceeds this worker's max_lora_rank 8",
        str(root / "pickled"): "refusing to unpickle",
        str(outside): "outside the allowed adapter roots",
        str(root / "escape"): "outside the allowed adapter roots",
        "s3://bucket/adapters/x": "no resolver is configured",
        "hf://org/adapter": "no resolver is configured",
        "ftp://host/x": "unsupported scheme",
        str(bad_cfg): "use_dora",
        str(root / "missing"): "not a directory",
    }
    for uri, msg in cases.items():
        with pytest.raises(AdapterError, match=msg):
            eng.load_adapter("bad", uri)
        _still_serving(eng, "good")
    assert not marker.exists()
    assert eng.store.names() == ["good"] and eng.store.counters["refusals"] == len(cases)
    with pytest.raises(UnknownAdapterError):
        eng.add_request("x", PROMPT, GREEDY, "bad")


def test_file_uri_and_configured_resolver(make_engine, adapters, adapter_root):
    eng = make_engine()
    assert eng.load_adapter("f", "file://" + str(adapters["ad-r4"])).rank == 4
    eng.store.resolvers["hf"] = lambda uri: adapters["ad-r8"]
    assert eng.load_adapter("h", "hf://org/ad-r8").rank == 8
    _still_serving(eng, "h")
    no_roots = make_engine(adapter_roots=[])
    with pytest.raises(AdapterError, match="no adapter roots are configured"):
        no_roots.load_adapter("x", str(adapters["ad-r4"]))


def test_version_switch_keeps_in_flight_requests_on_old_version(make_engine, adapters, hf_greedy):
    eng = make_engine(max_loras=2)
    v1 = eng.load_adapter("live", str(adapters["ad-r8"]))
    assert eng.load_adapter("live", str(adapters["ad-r8"])) is v1  # same content: same version, no reload
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    eng.add_request("old", PROMPT, params, "live")
    for _ in range(3):
        eng.step()
    v2 = eng.load_adapter("live", str(adapters["ad-r8v2"]))
    assert v2.version != v1.version and v1.retired and v1.tier == "gpu"
    eng.add_request("new", PROMPT, params, "live")
    final = {}
    while eng.has_unfinished_requests():
        final.update({o.request_id: o for o in eng.step() if o.finished})
    assert final["old"].lora_version == v1.version and final["new"].lora_version == v2.version
    assert final["old"].output_token_ids == hf_greedy(PROMPT, 12, "ad-r8")
    assert final["new"].output_token_ids == hf_greedy(PROMPT, 12, "ad-r8v2")
    assert v1.tier == "disk" and v1 not in eng.store.versions()  # dropped once its last request finished


def test_unload_lets_running_requests_finish_and_refuses_new_ones(make_engine, adapters, hf_greedy):
    eng = make_engine()
    eng.load_adapter("tmp", str(adapters["ad-r16rs"]))
    eng.add_request("r", PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), "tmp")
    eng.step()
    eng.unload_adapter("tmp")
    with pytest.raises(UnknownAdapterError):
        eng.add_request("r2", PROMPT, GREEDY, "tmp")
    with pytest.raises(UnknownAdapterError):
        eng.unload_adapter("tmp")
    final = {}
    while eng.has_unfinished_requests():
        final.update({o.request_id: o for o in eng.step() if o.finished})
    assert final["r"].output_token_ids == hf_greedy(PROMPT, 8, "ad-r16rs")
    assert eng.store.versions() == [] and eng.store.stats()["gpu"] == 0


def test_adapter_gone_from_disk_aborts_its_request_only(make_engine, adapters, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(adapters["ad-r4"], root / "gone")
    eng = make_engine(max_loras=1, max_cpu_loras=1, adapter_roots=[str(root), str(adapters["ad-r8"].parent)])
    eng.load_adapter("gone", str(root / "gone"))
    eng.load_adapter("ad-r8", str(adapters["ad-r8"]))  # evicts "gone" from host memory (1 host entry)
    assert eng.store.current("gone").tier == "disk"
    shutil.rmtree(root / "gone")
    eng.add_request("a", PROMPT, GREEDY, "gone")
    eng.add_request("b", PROMPT, GREEDY, "ad-r8")
    final = {}
    while eng.has_unfinished_requests():
        final.update({o.request_id: o for o in eng.step() if o.finished})
    assert final["a"].finish_reason == "abort" and final["a"].output_token_ids == []
    assert final["b"].finish_reason == "length" and len(final["b"].output_token_ids) == 10
    assert eng.block_manager.num_free == eng.block_manager.num_blocks


def test_host_cap_never_evicts_the_adapter_being_loaded(make_engine, adapters, hf_greedy):
    eng = make_engine(max_loras=2, max_cpu_loras=2)
    long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for n in ("ad-r4", "ad-r8"):
        eng.load_adapter(n, str(adapters[n]))
        eng.add_request(f"pin-{n}", PROMPT, long, n)
    eng.step()  # both slots pinned by running requests; host memory is at its cap
    c = eng.load_adapter("ad-r16rs", str(adapters["ad-r16rs"]))
    assert c.tier == "host"  # over the cap by one rather than dropping what was just loaded
    out = {}
    eng.add_request("c", PROMPT, GREEDY, "ad-r16rs")
    while eng.has_unfinished_requests():
        out.update({o.request_id: o for o in eng.step() if o.finished})
    assert out["c"].output_token_ids == hf_greedy(PROMPT, 10, "ad-r16rs")
