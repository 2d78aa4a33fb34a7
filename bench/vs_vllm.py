"""LoRA Fleet's worker side by side with stock vLLM on one GPU, over HTTP: same checkpoint, adapters, client.

What runs: a random-weight Llama checkpoint in HF format (`hf_checkpoint.py`: Llama-3.1-8B shape, a word-level
tokenizer over its 128256 ids) and PEFT adapters are written once; then for each *set* of runs, `vllm serve`
(`--enable-lora`, `--max-loras`, `--max-cpu-loras`, `--max-lora-rank`, its default torch.compile and CUDA graphs)
serves them and vLLM's own client (`vllm bench serve`, random dataset, `--ignore-eos`, so both engines generate the
same number of tokens) drives it; the server stops and `lorafleet worker` serves the same files and takes the same
client commands. vLLM goes first in each set because the Poisson rates are fractions of *its* measured max request
throughput.

Sets (`--sets`, in this order of priority inside a set's runs):
- `r16`: 128 rank-16 adapters (all 7 projections), 32 GPU slots, `--max-cpu-loras 128`: `max_32` (closed loop,
  every request at once, 32 adapters), `poisson_32_50` (Poisson at 50% of vLLM's `max_32` request rate), `max_128`
  (128 adapters over the 32 slots), `poisson_32_25`, `poisson_32_75`.
- `base`: no adapters; vLLM without `--enable-lora`: `max_0`.
- `mixed`: 32 adapters of ranks 8/16/64 in turn, `--max-lora-rank 64` (vLLM pads every slot to it): `max_mixed`.

Metrics (ours / vLLM, same GPU, same run): `vs_vllm_throughput_{0,32,128,mixed_rank}` (output tok/s),
`vs_vllm_{tpot,ttft}_p99_ratio_{25,50,75}` and the raw figures of both engines.

GPU machine (vLLM unpacked from the pack as shared/vllm-pack/README.md says; PYTHONPATH holds its site/):
    python3 bench/vs_vllm.py --out $OUT --sets r16 --deadline-s 560
CPU (tiny model; our worker stands in for vLLM and `serve_client.py` for vLLM's client; tests/worker/
test_vs_vllm_bench.py runs this):
    python bench/vs_vllm.py --shape tiny --device cpu --vllm-engine worker --client builtin --out DIR
Writes DIR/vs_vllm_<set>.json (`command`, `device`, `commit`, `metrics`, every run's client summary for both
engines, the server and client commands, start-up times) after every run, so a run cut short keeps what finished.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # appended, never prepended: the repo's operator/ would shadow the stdlib
try:  # the checkout, not installed (the GPU machine): lorafleet.worker / .operator map onto worker/ and operator/
    import lorafleet.operator  # noqa: F401
except ImportError:
    import lorafleet

    lorafleet.__path__.append(str(ROOT))

from bench.llama_shapes import LLAMA_31_8B, LLAMA_32_1B  # noqa: E402
from bench.vllm_bench_driver import DONE as DRIVER_DONE  # noqa: E402

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
    tie_word_embeddings=False,
    rope_theta=10000.0,
    max_position_embeddings=2048,
)
# a few-layer model with the 8B's head size and vocabulary: a fast GPU smoke of both engines' whole serving path
SMALL = dict(LLAMA_31_8B, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8)
SHAPES = {"8b": LLAMA_31_8B, "1b": LLAMA_32_1B, "small": SMALL, "tiny": TINY}
MIXED_RANKS = (8, 16, 64)
FRACTIONS = {"25": 0.25, "50": 0.50, "75": 0.75}

# Starts `lorafleet worker` from the checkout when the package is not installed (the GPU machine): lorafleet.worker
# and lorafleet.operator map onto worker/ and operator/ as setup.py maps them.
WORKER_SHIM = (
    "import sys; sys.path.append({root!r})\n"
    "try:\n    import lorafleet.worker\n"
    "except ImportError:\n    import lorafleet; lorafleet.__path__.append({root!r})\n"
    "from lorafleet.cli import main; sys.exit(main(sys.argv[1:]))"
)
VLLM_ENV = {
    "VLLM_USE_FLASHINFER_SAMPLER": "0",  # the pack leaves flashinfer out (shared/vllm-pack/README.md)
    "VLLM_USE_DEEP_GEMM": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # the operator's client loads and unloads adapters at run time
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


@dataclass
class RunSpec:
    """One client run: `adapters` is how many of the set's adapters the requests draw from (0: the base model);
    `rate` is "max" (every request at once) or a fraction of vLLM's max request throughput in this set."""

    name: str
    adapters: int
    rate: str | float
    prompts_scale: float = 1.0


@dataclass
class SetSpec:
    name: str
    ranks: list[int]
    max_loras: int
    max_cpu_loras: int
    max_rank: int
    runs: list[RunSpec] = field(default_factory=list)


def set_specs(n_adapters: int, slots: int) -> dict[str, SetSpec]:
    r16 = SetSpec(
        "r16",
        [16] * n_adapters,
        slots,
        n_adapters,
        16,
        [
            RunSpec("max_32", slots, "max"),
            RunSpec("poisson_32_50", slots, 0.50, 0.5),
            RunSpec(f"max_{n_adapters}", n_adapters, "max"),
            RunSpec("poisson_32_25", slots, 0.25, 0.25),
            RunSpec("poisson_32_75", slots, 0.75, 0.75),
        ],
    )
    base = SetSpec("base", [], slots, slots, 16, [RunSpec("max_0", 0, "max")])
    mixed = SetSpec(
        "mixed",
        [MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(slots)],
        slots,
        slots,
        max(MIXED_RANKS),
        [RunSpec("max_mixed", slots, "max")],
    )
    return {"r16": r16, "base": base, "mixed": mixed}


# ---- servers ---------------------------------------------------------------------------------------------------
def _pythonpath(extra: list[str]) -> str:
    parts = [p for p in extra if p] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


def vllm_command(args, model: Path, spec: SetSpec, modules: list[tuple[str, Path]], port: int) -> list[str]:
    cmd = [sys.executable, "-P", "-m", "vllm.entrypoints.cli.main", "serve", str(model)]
    cmd += ["--served-model-name", "base", "--port", str(port), "--host", "127.0.0.1", "--seed", "0"]
    cmd += ["--attention-backend", "FLASH_ATTN", "--max-model-len", str(args.max_model_len)]
    cmd += ["--gpu-memory-utilization", str(args.memory_fraction), "--max-num-seqs", str(args.max_num_seqs)]
    cmd += ["--max-num-batched-tokens", str(args.max_batched_tokens), "--uvicorn-log-level", "warning"]
    if modules:
        cmd += ["--enable-lora", "--max-loras", str(spec.max_loras), "--max-cpu-loras", str(spec.max_cpu_loras)]
        cmd += ["--max-lora-rank", str(spec.max_rank), "--lora-modules"]
        cmd += [f"{n}={p}" for n, p in modules]
    return cmd


def worker_command(
    args, model: Path, spec: SetSpec, modules: list[tuple[str, Path]], port: int, root: Path
) -> list[str]:
    cmd = [sys.executable, "-P", "-c", WORKER_SHIM.format(root=str(ROOT)), "worker", "--model", str(model)]
    cmd += ["--served-model-name", "base", "--port", str(port), "--host", "127.0.0.1", "--device", args.device]
    cmd += ["--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs)]
    cmd += ["--max-batched-tokens", str(args.max_batched_tokens), "--max-waiting", "0", "--log-level", "WARNING"]
    cmd += ["--max-loras", str(spec.max_loras), "--max-cpu-loras", str(spec.max_cpu_loras)]
    cmd += ["--max-lora-rank", str(spec.max_rank), "--adapter-root", str(root)]
    if args.device.startswith("cuda"):
        cmd += ["--kv-cache-fraction", str(args.memory_fraction)]
    for n, p in modules:
        cmd += ["--lora-modules", f"{n}={p}"]
    return cmd


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except Exception:  # noqa: BLE001 - not up yet
        return 0


class Server:
    """A server subprocess in its own process group, its log in a file; ready when `ready_path` answers 200."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, port: int, ready_path: str) -> None:
        self.cmd, self.log, self.port, self.ready_path = cmd, log, port, ready_path
        self._fh = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._fh, stderr=subprocess.STDOUT, cwd="/tmp", start_new_session=True
        )
        self.t0 = time.perf_counter()
        self.startup_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float) -> float:
        while time.perf_counter() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log tail:\n{self.tail()}")
            if _get(self.url + self.ready_path) == 200:
                self.startup_s = time.perf_counter() - self.t0
                return self.startup_s
            time.sleep(1.0)
        raise TimeoutError(f"server not ready after {timeout:.0f} s; log tail:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        self._fh.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # vLLM's engine-core child holds the GPU memory: wait until the whole group is gone before the next server
        for _ in range(60):
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._fh.close()


# ---- client ----------------------------------------------------------------------------------------------------
VLLM_BENCH = ["-m", "vllm.entrypoints.cli.main", "bench", "serve"]


def client_args(args, url: str, model: Path, names: list[str], rate: str, n: int, result: Path) -> list[str]:
    """The client's arguments: `vllm bench serve`'s (after `bench serve`), or `serve_client.py`'s (same meaning)."""
    common = ["--model", "base", "--tokenizer", str(model), "--num-prompts", str(n), "--request-rate", rate]
    common += ["--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len)]
    common += ["--random-range-ratio", str(args.range_ratio), "--ignore-eos", "--seed", str(args.seed)]
    if args.client == "vllm":
        cmd = ["--backend", "openai", "--base-url", url, "--dataset-name", "random", *common, "--disable-tqdm"]
        cmd += ["--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"]
        cmd += ["--num-warmups", str(args.warmups), "--save-result", "--result-dir", str(result.parent)]
        cmd += ["--result-filename", result.name]
    else:
        cmd = ["--base-url", url, *common, "--result-file", str(result)]
    if names:
        cmd += ["--lora-modules", *names]
    return cmd


class BenchClient:
    """Runs client argument lists: through one long-lived `vllm_bench_driver.py` process (vLLM's client imported
    once), or one `serve_client.py` process per run."""

    def __init__(self, kind: str, env: dict[str, str], log: Path) -> None:
        self.kind, self.env, self.log = kind, env, log
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()

    def command(self, argv: list[str]) -> list[str]:
        """The equivalent stand-alone command line (what the JSON records)."""
        if self.kind == "vllm":
            return ["python3", *VLLM_BENCH, *argv]
        return ["python3", str(ROOT / "bench" / "serve_client.py"), *argv]

    def _pump(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with open(self.log, "a") as fh:
            for line in self._proc.stdout:
                if line.startswith(DRIVER_DONE):
                    self._lines.put(line)
                else:
                    fh.write(line)
                    fh.flush()
        self._lines.put(None)

    def _wait_done(self, timeout: float) -> int:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty as exc:
            self.close()
            raise TimeoutError(f"client did not finish in {timeout:.0f} s") from exc
        if line is None:
            raise RuntimeError("client driver exited")
        return int(line.split()[1])

    def run(self, argv: list[str], timeout: float) -> int:
        with open(self.log, "a") as fh:
            fh.write("$ " + " ".join(self.command(argv)) + "\n")
        if self.kind != "vllm":
            with open(self.log, "a") as fh:
                cmd = [sys.executable, "-P", str(ROOT / "bench" / "serve_client.py"), *argv]
                proc = subprocess.run(
                    cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT, cwd="/tmp", timeout=timeout
                )
            return proc.returncode
        if self._proc is None or self._proc.poll() is not None:
            driver = [sys.executable, "-P", str(ROOT / "bench" / "vllm_bench_driver.py")]
            self._proc = subprocess.Popen(
                driver,
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd="/tmp",
                start_new_session=True,
            )
            threading.Thread(target=self._pump, daemon=True).start()
            self._wait_done(timeout)  # imports
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(argv) + "\n")
        self._proc.stdin.flush()
        return self._wait_done(timeout)

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()


SUMMARY_KEYS = (
    "duration",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
)


def run_client(client: BenchClient, argv: list[str], result: Path, timeout: float) -> dict:
    t = time.perf_counter()
    result.unlink(missing_ok=True)
    rc = client.run(argv, timeout)
    if rc != 0 or not result.exists():
        raise RuntimeError(f"client exited with {rc}; see {client.log}")
    raw = json.loads(result.read_text())
    out = {k: raw.get(k) for k in SUMMARY_KEYS}
    for m in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p99"):
            out[f"{stat}_{m}_ms"] = raw.get(f"{stat}_{m}_ms")
    out["client_wall_s"] = time.perf_counter() - t
    return out


# ---- orchestration ---------------------------------------------------------------------------------------------
def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _commit() -> str | None:
    if os.environ.get("LORAFLEET_COMMIT"):
        return os.environ["LORAFLEET_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True, stderr=subprocess.DEVNULL)
    except Exception:  # noqa: BLE001 - the GPU machine gets the tree without .git
        return None


def ratios(runs: dict) -> dict:
    """`vs_vllm_*` metrics from the runs that have both engines: throughput ratios are ours/vLLM output tok/s
    (higher is better), latency ratios ours/vLLM p99 (lower is better)."""
    m: dict = {}
    names = {"max_0": "0", "max_32": "32", "max_128": "128", "max_mixed": "mixed_rank", "max_skewed": "skewed"}
    for run, res in runs.items():
        v, o = res.get("vllm"), res.get("ours")
        if not v or not o:
            continue
        key = names.get(run)
        if key is None and run.startswith("max_"):
            key = run[4:]
        if key is not None and v.get("output_throughput"):
            m[f"vs_vllm_throughput_{key}"] = o["output_throughput"] / v["output_throughput"]
            m[f"vllm_output_tok_s_{key}"] = v["output_throughput"]
            m[f"ours_output_tok_s_{key}"] = o["output_throughput"]
        if run.startswith("poisson_32_"):
            pct = run.rsplit("_", 1)[1]
            for lat in ("tpot", "ttft"):
                if v.get(f"p99_{lat}_ms"):
                    m[f"vs_vllm_{lat}_p99_ratio_{pct}"] = o[f"p99_{lat}_ms"] / v[f"p99_{lat}_ms"]
                for eng, r in (("vllm", v), ("ours", o)):
                    for stat in ("median", "p99"):
                        m[f"{eng}_{lat}_{stat}_ms_{pct}"] = r.get(f"{stat}_{lat}_ms")
    return m


def client_check(args, engine: str, url: str, spec: SetSpec, root: Path) -> dict:
    """The operator's worker client against this server (`worker_client_check.py`), with two adapters written for
    it: one loaded through the API, the other its in-place reload."""
    from bench.hf_checkpoint import write_adapters
    from bench.worker_client_check import run_check

    new, again = write_adapters(root, SHAPES[args.shape], [16, 16], root / "base", "check-", 2, args.gen_device)
    flavour = "vllm" if engine == "vllm" and args.vllm_engine == "vllm" else "lorafleet"
    serve = [f"{spec.name}-{i}" for i in range(min(2, len(spec.ranks)))]
    return run_check(flavour, url, (new.name, new), again, serve)


def run_set(args, spec: SetSpec, model: Path, root: Path, out: Path, t_start: float, client: BenchClient) -> dict:
    import torch

    shape = SHAPES[args.shape]
    from bench.hf_checkpoint import write_adapters

    t = time.perf_counter()
    prefix = f"{spec.name}-"  # adapter names are DNS-1123 subdomains
    paths = write_adapters(root, shape, spec.ranks, model, prefix, distinct=args.distinct, device=args.gen_device)
    modules = [(p.name, p) for p in paths]
    adapters_s = time.perf_counter() - t
    doc: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": _device_name(args.device),
        "commit": _commit(),
        "torch": torch.__version__,
        "set": spec.name,
        "settings": {
            "shape": args.shape,
            "ranks": sorted(set(spec.ranks)),
            "adapters": len(spec.ranks),
            "max_loras": spec.max_loras,
            "max_cpu_loras": spec.max_cpu_loras,
            "max_lora_rank": spec.max_rank,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "range_ratio": args.range_ratio,
            "num_prompts": args.num_prompts,
            "max_num_seqs": args.max_num_seqs,
            "max_batched_tokens": args.max_batched_tokens,
            "max_model_len": args.max_model_len,
            "memory_fraction": args.memory_fraction,
            "client": "vllm bench serve" if args.client == "vllm" else "bench/serve_client.py (stand-in)",
            "vllm_engine": "vllm serve" if args.vllm_engine == "vllm" else "lorafleet worker (stand-in for vLLM)",
        },
        "adapters_written_s": adapters_s,
        "servers": {},
        "startup_s": {},
        "runs": {},
        "skipped": [],
        "errors": [],
    }
    path = out / f"vs_vllm_{spec.name}.json"

    def save() -> None:
        doc["metrics"] = ratios(doc["runs"])
        path.write_text(json.dumps(doc, indent=1, default=str))

    vllm_rate: dict[str, float] = {}
    for engine in ("vllm", "ours"):
        port = args.port + (0 if engine == "vllm" else 1)
        real_vllm = engine == "vllm" and args.vllm_engine == "vllm"
        if real_vllm:
            cmd = vllm_command(args, model, spec, modules, port)
            env = {**os.environ, **VLLM_ENV, "PYTHONPATH": _pythonpath([args.vllm_site])}
            ready = "/v1/models"
        else:
            cmd = worker_command(args, model, spec, modules, port, root)
            env = {**os.environ, "PYTHONPATH": _pythonpath([args.vllm_site] if args.vllm_site else [])}
            ready = "/ready"
        doc["servers"][engine] = " ".join(cmd[:3] + ["<shim>"] + cmd[4:]) if "-c" in cmd[:3] else " ".join(cmd)
        if args.deadline_s - (time.perf_counter() - t_start) < args.min_start_s:
            doc["skipped"].append(f"{engine}: too close to the deadline to start")
            save()
            continue
        server = Server(cmd, env, out / f"server_{spec.name}_{engine}.log", port, ready)
        try:
            doc["startup_s"][engine] = server.wait_ready(args.startup_timeout)
            save()
            for run in [r for r in spec.runs if not args.runs or r.name in args.runs.split(",")]:
                left = args.deadline_s - (time.perf_counter() - t_start)
                if left < args.min_run_s:
                    doc["skipped"].append(f"{engine}/{run.name}: {left:.0f} s left")
                    continue
                n = max(8, int(args.num_prompts * run.prompts_scale))
                if run.rate == "max":
                    rate = "inf"
                else:
                    base = vllm_rate.get("max_32")
                    if base is None:
                        doc["skipped"].append(f"{engine}/{run.name}: no vLLM max_32 rate")
                        continue
                    rate = f"{base * float(run.rate):.3f}"
                names = [name for name, _ in modules[: run.adapters]]
                result = out / f"client_{spec.name}_{run.name}_{engine}.json"
                argv = client_args(args, server.url, model, names, rate, n, result)
                try:
                    res = run_client(client, argv, result, timeout=left)
                except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others
                    doc["errors"].append(f"{engine}/{run.name}: {exc}")
                    save()
                    continue
                res["request_rate"] = rate
                res["client_command"] = " ".join(client.command(argv))
                doc["runs"].setdefault(run.name, {})[engine] = res
                if engine == "vllm" and run.rate == "max":
                    vllm_rate[run.name] = res["request_throughput"]
                print(f"[{spec.name}] {engine} {run.name}: {res['output_throughput']:.0f} tok/s", flush=True)
                save()
            if args.client_check and modules:
                doc.setdefault("client_check", {})[engine] = client_check(args, engine, server.url, spec, root)
                print(f"[{spec.name}] {engine} client check ok: {doc['client_check'][engine]['ok']}", flush=True)
                save()
        except Exception as exc:  # noqa: BLE001 - recorded; the other engine still runs
            doc["errors"].append(f"{engine}: {exc}")
            print(f"[{spec.name}] {engine} failed: {exc}", flush=True)
        finally:
            server.stop()
            save()
    return doc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/vs_vllm", help="where the checkpoint and adapters are written")
    p.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--sets", default="r16,base,mixed")
    p.add_argument("--adapters", type=int, default=128, help="adapters of the r16 set")
    p.add_argument("--slots", type=int, default=32, help="GPU adapter slots (--max-loras) of every set")
    p.add_argument("--distinct", type=int, default=4, help="adapters with their own weights per rank")
    p.add_argument("--runs", default="", help="only these runs of each set, comma-separated (e.g. max_32,max_128)")
    p.add_argument("--num-prompts", type=int, default=768)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--range-ratio", type=float, default=0.5)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--memory-fraction", type=float, default=0.85, help="vLLM --gpu-memory-utilization; ours the same")
    p.add_argument("--warmups", type=int, default=16, help="vllm bench serve --num-warmups")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8701)
    p.add_argument("--vllm-engine", default="vllm", choices=["vllm", "worker"], help="worker: CPU stand-in")
    p.add_argument("--client", default="vllm", choices=["vllm", "builtin"], help="builtin: CPU stand-in")
    p.add_argument("--vllm-site", default="/tmp/vsite/site", help="the unpacked pack's site/ (PYTHONPATH)")
    p.add_argument("--startup-timeout", type=float, default=400.0)
    p.add_argument("--deadline-s", type=float, default=1e9, help="no server starts / run begins after this")
    p.add_argument("--min-start-s", type=float, default=0.0, help="a server starts only with this much time left")
    p.add_argument("--min-run-s", type=float, default=30.0, help="a run starts only with this much time left")
    p.add_argument("--client-check", action="store_true", help="run worker_client_check.py against each server")
    p.add_argument("--keep", action="store_true", help="reuse a checkpoint already in --work")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    args.gen_device = "cuda" if args.device.startswith("cuda") else "cpu"
    if args.vllm_site and not Path(args.vllm_site).is_dir():
        args.vllm_site = ""
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    from bench.hf_checkpoint import write_checkpoint

    model = work / "base"
    if not (args.keep and (model / "model.safetensors.index.json").exists()):
        shutil.rmtree(work, ignore_errors=True)
        t = time.perf_counter()
        dtype = "bfloat16" if args.gen_device == "cuda" else "float32"
        write_checkpoint(model, SHAPES[args.shape], device=args.gen_device, dtype=dtype)
        print(f"checkpoint written in {time.perf_counter() - t:.1f} s", flush=True)
        if args.gen_device == "cuda":
            import torch

            torch.cuda.empty_cache()
    specs = set_specs(args.adapters, args.slots)
    cenv = {**os.environ, **VLLM_ENV, "PYTHONPATH": _pythonpath([args.vllm_site])}
    client = BenchClient(args.client, cenv, out / "client.log")
    failed = False
    for name in [s for s in args.sets.split(",") if s]:
        doc = run_set(args, specs[name], model, work, out, t_start, client)
        failed |= bool(doc["errors"])
        print(json.dumps({"set": name, "metrics": doc["metrics"], "errors": doc["errors"]}, indent=1), flush=True)
    client.close()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
