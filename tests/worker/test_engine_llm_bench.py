"""bench/engine_llm_bench.py as the GPU run uses it, in its CPU smoke mode: one command, both scheduling modes,
adapters over fewer slots, and a JSON with the keys every bench result has."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_cpu_run_writes_the_result_json(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench/engine_llm_bench.py"), "--device", "cpu", "--tiny"]
    cmd += ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "out/engine_llm_engine.json").read_text())
    assert {"command", "device", "commit", "metrics", "runs", "config"} <= set(res)
    assert res["errors"] == {} and res["device"]["device"] == "cpu" and "--tiny" in res["command"]
    runs = res["runs"]["tiny"]["runs"]
    assert set(runs) == {f"adapters_{n}{m}" for n in (0, 2, 4, 8) for m in ("", "_async")}
    for r in runs.values():
        assert r["output_tokens_seen"] == r["output_tokens"] > 0 and r["tokens_per_s"] > 0
    m = res["metrics"]
    assert res["runs"]["tiny"]["max_loras"] == 4
    for n in ("0", "2", "4", "8_over_4_slots"):
        sync, asyn = m[f"llm_engine_tiny_adapters_{n}_sync_tok_s"], m[f"llm_engine_tiny_adapters_{n}_async_tok_s"]
        assert abs(m[f"llm_engine_tiny_adapters_{n}_async_vs_sync"] - asyn / sync) < 1e-9
    base = m["llm_engine_tiny_adapters_0_sync_tok_s"]
    assert (
        abs(m["llm_engine_tiny_adapters_8_over_4_slots_vs_0_sync"] * base - runs["adapters_8"]["tokens_per_s"]) < 1e-6
    )
    for r in runs.values():  # the step-time split adds up to the steps that did work
        assert r["prefill_steps"] >= 1 and r["prefill_steps"] + r["decode_steps"] <= r["steps"]
    prof = res["runs"]["tiny"]["profile"]
    assert set(prof) == {"adapters_0", "adapters_0_async"}
    assert all(p["ms_per_step"] > 0 and "engine" in p["cprofile_by_tottime"] for p in prof.values())
