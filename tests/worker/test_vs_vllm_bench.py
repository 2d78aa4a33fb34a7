"""bench/vs_vllm.py end to end on CPU: a tiny checkpoint, adapters, two real `lorafleet worker` servers (one stands
in for `vllm serve`), every run of the sets, the operator's client check, and the JSON the GPU run writes.

The client side runs through `vllm_bench_driver.py` (the long-lived process the GPU run uses for `vllm bench serve`)
over a stand-in `vllm.benchmarks.serve` module written here, whose `main` is `serve_client.py`: that checks the
driver protocol and the result-file handshake without vLLM, which CI does not have.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[2]

FAKE_SERVE = """
import argparse, asyncio, json, os, sys
sys.path.append({root!r})
from bench import serve_client

def add_cli_args(p):
    for flag in ("--backend", "--base-url", "--dataset-name", "--model", "--tokenizer", "--percentile-metrics",
                 "--metric-percentiles", "--result-dir", "--result-filename", "--request-rate"):
        p.add_argument(flag)
    for flag in ("--num-prompts", "--random-input-len", "--random-output-len", "--num-warmups", "--seed"):
        p.add_argument(flag, type=int)
    p.add_argument("--random-range-ratio", type=float)
    p.add_argument("--lora-modules", nargs="*", default=[])
    for flag in ("--ignore-eos", "--disable-tqdm", "--save-result"):
        p.add_argument(flag, action="store_true")

def main(args):
    assert args.backend == "openai" and args.dataset_name == "random" and args.save_result and args.ignore_eos
    args.max_concurrency = None
    res = asyncio.run(serve_client.run(args))
    res["fake_vllm_client"] = True
    with open(os.path.join(args.result_dir, args.result_filename), "w") as fh:
        json.dump(res, fh)
    return res
"""


def _fake_vllm(site: Path) -> Path:
    pkg = site / "vllm" / "benchmarks"
    pkg.mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "serve.py").write_text(FAKE_SERVE.format(root=str(ROOT)))
    return site


def test_word_level_tokenizer_round_trips_every_id(tmp_path):
    spec = importlib.util.spec_from_file_location("hf_checkpoint", ROOT / "bench" / "hf_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.write_tokenizer(tmp_path, 300)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ids = list(range(4, 300)) + [299, 4, 17]
    assert tok.get_vocab_size() == 300
    assert tok.encode(tok.decode(ids)).ids == ids
    assert tok.decode([17, 18]) == "w17 w18"


def test_cpu_run_writes_both_engines_numbers_and_ratios(tmp_path):
    site = _fake_vllm(tmp_path / "site")
    out = tmp_path / "out"
    cmd = [sys.executable, "-P", str(ROOT / "bench/vs_vllm.py"), "--shape", "tiny", "--device", "cpu"]
    cmd += ["--vllm-engine", "worker", "--client", "vllm", "--vllm-site", str(site), "--out", str(out)]
    cmd += ["--work", str(tmp_path / "work"), "--adapters", "4", "--slots", "2", "--num-prompts", "8"]
    cmd += ["--input-len", "12", "--output-len", "6", "--max-num-seqs", "8", "--max-model-len", "128"]
    cmd += ["--range-ratio", "0", "--sets", "r16,mixed", "--client-check", "--port", "8931"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r16 = json.loads((out / "vs_vllm_r16.json").read_text())
    assert {"command", "device", "commit", "metrics", "runs", "servers", "startup_s"} <= set(r16)
    assert r16["errors"] == [] and r16["skipped"] == [] and r16["device"].startswith("cpu")
    assert set(r16["runs"]) == {"max_32", "poisson_32_50", "max_4", "poisson_32_25", "poisson_32_75"}
    for run in r16["runs"].values():
        for eng in ("vllm", "ours"):
            r = run[eng]
            assert r["completed"] == r["total_output_tokens"] / 6 and r["failed"] == 0
            assert "bench serve" in r["client_command"] and "--ignore-eos" in r["client_command"]
    raw = json.loads((out / "client_r16_max_32_ours.json").read_text())
    assert raw["fake_vllm_client"] is True  # the run went through the driver, not serve_client's own CLI
    m = r16["metrics"]
    runs = r16["runs"]
    assert (
        m["vs_vllm_throughput_32"]
        == runs["max_32"]["ours"]["output_throughput"] / (runs["max_32"]["vllm"]["output_throughput"])
    )
    assert m["vs_vllm_throughput_4"] > 0
    for pct in ("25", "50", "75"):
        p = runs[f"poisson_32_{pct}"]
        assert m[f"vs_vllm_tpot_p99_ratio_{pct}"] == p["ours"]["p99_tpot_ms"] / p["vllm"]["p99_tpot_ms"]
        assert m[f"vs_vllm_ttft_p99_ratio_{pct}"] == p["ours"]["p99_ttft_ms"] / p["vllm"]["p99_ttft_ms"]
    # the Poisson rates are fractions of the stand-in vLLM's measured max request rate, for both engines
    vmax = runs["max_32"]["vllm"]["request_throughput"]
    assert abs(float(runs["poisson_32_50"]["ours"]["request_rate"]) - 0.5 * vmax) < 1e-3
    assert "--max-lora-rank 16" in r16["servers"]["ours"] and "--max-loras 2" in r16["servers"]["ours"]
    for eng in ("vllm", "ours"):
        check = r16["client_check"][eng]
        assert check["ok"], check
        steps = check["steps"]
        assert steps["completion_per_adapter"]["detail"].keys() == {"r16-0", "r16-1", "check-0"}
        assert steps["completion_after_reload"]["detail"]["usage"]["completion_tokens"] == 4

    mixed = json.loads((out / "vs_vllm_mixed.json").read_text())
    assert mixed["errors"] == [] and mixed["settings"]["ranks"] == [8, 16]  # 2 slots: ranks 8, 16 in turn
    assert "vs_vllm_throughput_mixed_rank" in mixed["metrics"]
    assert "--max-lora-rank 64" in mixed["servers"]["ours"]
