"""What the engine reports per request beyond tokens: logprobs, stop_reason, min_tokens and kept stop strings, the
same with async scheduling as without (the async path settles logprobs one step later, from another copy).
"""

from __future__ import annotations

import math

import pytest
import torch
from lorafleet.worker.engine.sequence import SamplingParams

PROMPTS = [[5, 17, 300, 41, 9], [99, 7, 12], [100, 200, 300, 45, 46, 47, 48]]


def _run(eng, requests):
    for rid, prompt, params, name in requests:
        eng.add_request(rid, prompt, params, name)
    final = {}
    while eng.has_unfinished_requests():
        final.update({o.request_id: o for o in eng.step() if o.finished})
    return final


def _requests(ref):
    """Stop ids and strings read off a greedy reference run, so they really trigger."""
    probe = _run(ref, [(f"p{i}", p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), None) for i, p in
                       enumerate(PROMPTS)])  # fmt: skip
    out0 = probe["p0"].output_token_ids
    text1 = probe["p1"].text
    stop = next(text1[i : i + 2] for i in range(2, len(text1) - 2) if "\ufffd" not in text1[i : i + 2])
    return (
        [
            (
                "tok",
                PROMPTS[0],
                SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[out0[4]], logprobs=3, ignore_eos=True),
                None,
            ),  # fmt: skip
            (
                "min",
                PROMPTS[0],
                SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[out0[0]], min_tokens=3, logprobs=2),
                None,
            ),  # fmt: skip
            ("lora", PROMPTS[2], SamplingParams(temperature=0, max_tokens=6, logprobs=1, ignore_eos=True), "ad-r4"),
            ("str", PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True), None),
            (
                "kept",
                PROMPTS[1],
                SamplingParams(
                    temperature=0, max_tokens=12, stop=[stop], ignore_eos=True, include_stop_str_in_output=True
                ),
                None,
            ),  # fmt: skip
            (
                "len",
                PROMPTS[2],
                SamplingParams(temperature=0.9, seed=4, max_tokens=7, ignore_eos=True, logprobs=0),
                None,
            ),
        ],
        out0,
        text1,
        stop,
    )


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))],
)
def test_logprobs_stop_reasons_and_min_tokens_same_with_async_scheduling(make_engine, adapters, device):
    ref = make_engine(device=device)
    reqs, out0, text1, stop = _requests(ref)
    results = []
    for async_scheduling in (False, True):
        eng = make_engine(async_scheduling=async_scheduling, device=device)
        eng.load_adapter("ad-r4", str(adapters["ad-r4"]))
        results.append(_run(eng, reqs))
    sync, asyn = results
    first = out0.index(out0[4])
    assert sync["tok"].output_token_ids == out0[: first + 1] and sync["tok"].stop_reason == out0[4]
    assert sync["str"].stop_reason == stop and sync["str"].text == text1[: text1.index(stop)]
    assert sync["kept"].text == text1[: text1.index(stop) + len(stop)] and sync["kept"].stop_reason == stop
    assert sync["len"].finish_reason == "length" and sync["len"].stop_reason is None
    got = sync["min"].output_token_ids
    assert out0[0] not in got[:3] and len(got) >= 3 and got[0] != out0[0]  # masked: greedy takes the next token
    assert sync["min"].logprobs[0].top[0][0] == out0[0]  # raw logprobs: the masked token is still the likeliest
    for rid in sync:
        s, a = sync[rid], asyn[rid]
        assert (s.output_token_ids, s.finish_reason, s.stop_reason, s.text) == (
            a.output_token_ids,
            a.finish_reason,
            a.stop_reason,
            a.text,
        ), rid
        if s.logprobs is None:
            assert a.logprobs is None
            continue
        assert [e.token_id for e in s.logprobs] == s.output_token_ids
        assert [[t for t, _ in e.top] for e in s.logprobs] == [[t for t, _ in e.top] for e in a.logprobs]
        torch.testing.assert_close([e.logprob for e in s.logprobs], [e.logprob for e in a.logprobs], atol=1e-4, rtol=0)
    for e in sync["tok"].logprobs:  # greedy: the sampled token is the likeliest, the alternatives sorted
        assert len(e.top) == 3 and e.top[0] == (e.token_id, e.logprob)
        assert [v for _, v in e.top] == sorted((v for _, v in e.top), reverse=True)
    assert all(e.top == () and e.logprob <= 0 and math.isfinite(e.logprob) for e in sync["len"].logprobs)
