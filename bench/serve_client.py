"""A small stand-in for `vllm bench serve` (random dataset, OpenAI completions backend), for machines without vLLM.

Why it exists: `bench/vs_vllm.py` drives both engines with vLLM's own client on the GPU machine, where the vLLM pack
is unpacked; CI and the CPU test have no vLLM (the pack is built for Python 3.12 on the GPU machine's torch). This
client sends the same request body (`/v1/completions`, streaming, usage in the last chunk, `ignore_eos`, a LoRA name
drawn per request as vLLM's `--lora-assignment random` does), and computes the same metrics with the same
definitions (TTFT = first chunk with a choice; TPOT = (latency - TTFT) / (output tokens - 1); ITL = gaps between
chunks; output throughput = output tokens / wall time) and writes them under the same result keys, so the
orchestration reads one format. Its numbers are never reported as vLLM-client numbers.

    python bench/serve_client.py --base-url http://127.0.0.1:8000 --model base --tokenizer DIR \
        --num-prompts 64 --random-input-len 32 --random-output-len 16 --request-rate inf --result-file out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PERCENTILES = (50, 99)


@dataclass
class Outcome:
    prompt_len: int
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)


def make_prompts(
    tokenizer, n: int, input_len: int, output_len: int, range_ratio: float, seed: int
) -> list[tuple[str, int, int]]:
    """(prompt text, prompt tokens, output tokens) per request: lengths uniform in [L(1-r), L(1+r)], token ids uniform
    over the non-special vocabulary, decoded to text (the tokenizer of `hf_checkpoint` round-trips exactly)."""
    rng = np.random.default_rng(seed)
    special = set(tokenizer.all_special_ids)
    ids = np.array([i for i in range(len(tokenizer)) if i not in special])
    out = []
    for _ in range(n):
        plen = int(rng.integers(max(1, int(input_len * (1 - range_ratio))), int(input_len * (1 + range_ratio)) + 1))
        olen = int(rng.integers(max(1, int(output_len * (1 - range_ratio))), int(output_len * (1 + range_ratio)) + 1))
        toks = rng.choice(ids, size=plen).tolist()
        out.append((tokenizer.decode(toks), plen, olen))
    return out


async def one_request(client, url: str, body: dict, prompt_len: int) -> Outcome:
    res = Outcome(prompt_len=prompt_len)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    res.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
        res.latency = time.perf_counter() - start
        res.ok = res.ttft > 0.0
        if not res.ok:
            res.error = "no token in the stream"
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, as vLLM's client does
        res.error = repr(exc)
    return res


def summarize(outcomes: list[Outcome], duration: float) -> dict:
    """The keys `vllm bench serve --save-result` writes that `vs_vllm.py` reads."""
    done = [o for o in outcomes if o.ok]
    out_tokens = sum(o.output_tokens for o in done)
    res: dict = {
        "duration": duration,
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "total_input_tokens": sum(o.prompt_len for o in done),
        "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "errors_sample": [o.error for o in outcomes if not o.ok][:3],
    }
    series = {
        "ttft": [o.ttft for o in done],
        "tpot": [(o.latency - o.ttft) / (o.output_tokens - 1) for o in done if o.output_tokens > 1],
        "itl": [x for o in done for x in o.itl],
        "e2el": [o.latency for o in done],
    }
    for name, xs in series.items():
        arr = np.array(xs or [0.0]) * 1000.0
        res[f"mean_{name}_ms"] = float(arr.mean())
        res[f"median_{name}_ms"] = float(np.median(arr))
        for p in PERCENTILES:
            res[f"p{p}_{name}_ms"] = float(np.percentile(arr, p))
    return res


async def run(args: argparse.Namespace) -> dict:
    import httpx
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    prompts = make_prompts(
        tokenizer, args.num_prompts, args.random_input_len, args.random_output_len, args.random_range_ratio, args.seed
    )
    rng = random.Random(args.seed)
    models = [rng.choice(args.lora_modules) if args.lora_modules else args.model for _ in prompts]
    url = args.base_url.rstrip("/") + "/v1/completions"
    rate = float(args.request_rate)
    sem = asyncio.Semaphore(args.max_concurrency or len(prompts))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def send(i: int) -> Outcome:
            text, plen, olen = prompts[i]
            body = {
                "model": models[i],
                "prompt": text,
                "max_tokens": olen,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "ignore_eos": bool(args.ignore_eos),
            }
            async with sem:
                return await one_request(client, url, body, plen)

        t0 = time.perf_counter()
        tasks = []
        for i in range(len(prompts)):
            tasks.append(asyncio.create_task(send(i)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        outcomes = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return summarize(list(outcomes), duration)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--random-input-len", type=int, default=32)
    p.add_argument("--random-output-len", type=int, default=16)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--request-rate", default="inf")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--lora-modules", nargs="*", default=[])
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    res = asyncio.run(run(args))
    Path(args.result_file).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, list)}))
    return 0 if res["completed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
