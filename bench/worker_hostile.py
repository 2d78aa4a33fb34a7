"""Hostile input against a real `lorafleet worker` process (tiny model, CPU), and SIGKILL during feedback writes.

Phase `hostile`: while threads send what an attacker or a broken client sends (declared 50 MB bodies, chunked bodies
past the limit, JSON nested 100k deep, lone surrogates, malformed JSON, NaN and 1e999, client-supplied and slow chat
templates, 1 MiB chat bodies; 4 of the 8 threads tokenize 1 MiB and 256 KiB prompts in turn), a probe process GETs
`/health` every 20 ms. The probe's p99 under that load is the headline (target < 100 ms); the same probe with no
load, measured first in the same run, is the baseline, and the ratio of the two is printed. The machine's load
average before each phase goes in `notes.load_average` (a shared box: other work there shows in both numbers).
Every hostile answer must be a JSON 4xx (or the 200 of a tokenization): a 5xx, a non-JSON body or a reset
connection is counted.

Phase `crash`: writers post feedback pairs (each 202 acknowledges a durable record); the worker's process group is
SIGKILLed at a random moment, the worker restarted on the same training directory (its recovery runs on open), and
every acknowledged feedback id is looked up in the log it recovered. Lost records are the headline (target 0).

Writes bench/results/worker_hostile.json with, under `metrics`: health_p99_ms_under_hostile_load,
health_p99_ms_idle, health_p50_ms_under_hostile_load, hostile_requests, hostile_bad_answers (5xx, non-JSON or
connection errors; target 0), feedback_records_lost_after_crash_cases (target 0), feedback_acknowledged_in_crash_cases,
crash_cases. ~2 minutes on 2 busy cores.

Usage: python bench/worker_hostile.py [--duration 20] [--crash-cases 4] [--out bench/results/worker_hostile.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from common import RESULTS, provenance, write_result
from vs_vllm import WORKER_SHIM, Server

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]

TOKEN = "hostile-bench-admin"
ADAPTER = "ad"
MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fixture:
    """The tiny model, one adapter, a token file and a training directory, built once in a temporary folder."""

    def __init__(self, tmp: Path) -> None:
        from lorafleet.worker.testing import build_peft_adapter, build_tiny_llama

        self.tmp = tmp
        self.model = build_tiny_llama(tmp / "model", seed=0)
        self.adapter_root = tmp / "adapters"
        self.adapter = build_peft_adapter(self.adapter_root / ADAPTER, self.model, rank=4, seed=1)
        self.token_file = tmp / "token"
        self.token_file.write_text(TOKEN)
        self.training_dir = tmp / "training"
        self.starts = 0

    def start(self) -> Server:
        """A worker process in its own process group; returns once `/ready` answers 200."""
        port = free_port()
        cmd = [sys.executable, "-P", "-c", WORKER_SHIM.format(root=str(ROOT)), "worker", "--model", str(self.model)]
        cmd += ["--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
        cmd += ["--adapter-root", str(self.adapter_root), "--lora-modules", f"{ADAPTER}={self.adapter}"]
        cmd += ["--admin-token-file", str(self.token_file), "--feedback-adapter", ADAPTER]
        cmd += ["--num-kv-blocks", "256", "--block-size", "16", "--max-num-seqs", "8", "--log-level", "WARNING"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAFLEET_TRAINING_DIR": str(self.training_dir)}
        self.starts += 1
        server = Server(cmd, env, self.tmp / f"worker-{self.starts}.log", port, "/ready")
        server.wait_ready(180)
        return server


# ---- the health probe ----------------------------------------------------------------------------------------------
def _probe_loop(url: str, interval_s: float, stop, out) -> None:
    """GETs /health every `interval_s` on one keep-alive connection until `stop` is set; puts (latencies in ms,
    failures) on `out`. A failure counts as 10 s."""
    samples: list[float] = []
    failures = 0
    with httpx.Client(base_url=url, timeout=10) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                ok = c.get("/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            ms = (time.perf_counter() - t0) * 1000
            if not ok:
                failures += 1
                ms = max(ms, 10_000.0)
            samples.append(ms)
            stop.wait(interval_s)
    out.put((samples, failures))


class Probe:
    """The /health probe in a process of its own: in this one it would measure the hostile client threads' share of
    the GIL, not the worker's answer time."""

    def __init__(self, url: str, interval_s: float = 0.02) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._stop, self._out = ctx.Event(), ctx.Queue()
        self._proc = ctx.Process(target=_probe_loop, args=(url, interval_s, self._stop, self._out), daemon=True)
        self.samples: list[float] = []
        self.failures = 0

    def start(self) -> Probe:
        self._proc.start()
        return self

    def run_for(self, seconds: float) -> list[float]:
        self.start()
        time.sleep(seconds)
        return self.stop()

    def stop(self) -> list[float]:
        self._stop.set()
        self.samples, self.failures = self._out.get(timeout=60)
        self._proc.join(15)
        return self.samples


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# ---- hostile requests ----------------------------------------------------------------------------------------------
def raw_request(url: str, head: bytes, body: bytes = b"", timeout: float = 30.0) -> tuple[int, bytes]:
    """One request on a fresh socket, written as given (httpx would refuse a body shorter than its Content-Length);
    returns (status, body bytes) of the answer, (0, b"") when the connection broke first."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        try:
            s.sendall(head + body)
        except OSError:
            pass  # the server may answer and close before the whole body is sent (413 from Content-Length)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data:
                    header, _, rest = data.partition(b"\r\n\r\n")
                    length = next(
                        (
                            int(h.split(b":")[1])
                            for h in header.split(b"\r\n")
                            if h.lower().startswith(b"content-length")
                        ),
                        None,
                    )
                    if length is not None and len(rest) >= length:
                        break
        except OSError:
            pass
    if not data.startswith(b"HTTP/1.1 "):
        return 0, b""
    return int(data[9:12]), data.partition(b"\r\n\r\n")[2]


def _post_head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()


def _chunks(total: int, size: int = 64 << 10) -> Iterator[bytes]:
    yield b'{"model":"tiny","prompt":"'
    block = b"a" * size
    for _ in range(total // size):
        yield block
    yield b'"}'


WORDS = "the fleet serves many adapters and learns from feedback every day ".split()


def _text(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n_chars]


def hostile_cases(url: str) -> dict[str, Callable[[httpx.Client], tuple[int, bytes]]]:
    """Name -> one attempt (status, body). Each is answered with a 4xx by a healthy worker."""
    big_prompt = _text(MIB - 64, 1)
    chat_1mib = [{"role": "user", "content": _text(MIB // 64 - 16, i)} for i in range(62)]
    slow_template = "{% for i in range(10**9) %}{% for j in range(10**9) %}x{% endfor %}{% endfor %}"

    def json_post(path: str, content: bytes | str) -> Callable[[httpx.Client], tuple[int, bytes]]:
        body = content.encode() if isinstance(content, str) else content

        def go(c: httpx.Client) -> tuple[int, bytes]:
            r = c.post(path, content=body, headers={"Content-Type": "application/json"})
            return r.status_code, r.content

        return go

    def declared_50mb(c: httpx.Client) -> tuple[int, bytes]:
        return raw_request(url, _post_head("/v1/completions", 50 * MIB), b'{"model":"tiny","prompt":"' + b"a" * MIB)

    def chunked_8mb(c: httpx.Client) -> tuple[int, bytes]:
        r = c.post("/v1/completions", content=_chunks(8 * MIB), headers={"Content-Type": "application/json"})
        return r.status_code, r.content

    def tokenize(prompt: str) -> Callable[[httpx.Client], tuple[int, bytes]]:
        def go(c: httpx.Client) -> tuple[int, bytes]:
            r = c.post("/tokenize", json={"model": "tiny", "prompt": prompt})
            # a legitimate tokenization: 200 with its tokens (299 here, told apart from the 4xx of the other cases)
            return (r.status_code if r.status_code != 200 else 299), r.content

        return go

    return {
        "declared_50mb_body": declared_50mb,
        "chunked_8mb_body": chunked_8mb,
        "nested_100k": json_post("/v1/completions", '{"model":"tiny","prompt":' + "[" * 100_000 + "]" * 100_000 + "}"),
        "nested_feedback": json_post(
            "/v1/feedback", '{"adapter":"ad","kind":"pair","x":' + "[" * 50_000 + "]" * 50_000 + "}"
        ),
        "lone_surrogate": json_post("/v1/completions", '{"model":"tiny","prompt":"a\\ud800b","max_tokens":1}'),
        "surrogate_chat": json_post(
            "/v1/chat/completions", '{"model":"tiny","messages":[{"role":"user","content":"\\udfff"}]}'
        ),
        "malformed_json": json_post("/v1/completions", '{"model": "tiny", "prompt": "a", '),
        "nan": json_post("/v1/completions", '{"model":"tiny","prompt":"a","temperature":NaN}'),
        "huge_number": json_post("/v1/completions", '{"model":"tiny","prompt":"a","max_tokens":1e999}'),
        "client_template": json_post(
            "/v1/chat/completions",
            json.dumps(
                {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "chat_template": slow_template}
            ),
        ),
        "template_in_kwargs": json_post(
            "/v1/chat/completions",
            json.dumps(
                {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "x"}],
                    "chat_template_kwargs": {"chat_template": slow_template},
                }
            ),
        ),
        "chat_1mib": json_post(
            "/v1/chat/completions", json.dumps({"model": "tiny", "messages": chat_1mib, "max_tokens": 1})
        ),
        "tokenize_1mib": tokenize(big_prompt),  # ~400k tokens: over /tokenize's cap, 400 after the count
        "tokenize_256kib": tokenize(big_prompt[: MIB // 4]),  # ~100k tokens: 200, a megabyte of JSON
    }


def run_hostile(url: str, duration_s: float, threads: int, only: list[str] | None = None) -> dict:
    """Runs the cases at random from `threads` threads (half of them on the big tokenizations, in turn) while
    probing; `only` restricts the cases (to find which one stalls the worker)."""
    cases = hostile_cases(url)
    if only:
        cases = {n: f for n, f in cases.items() if n in only}
    big = [n for n in cases if n.startswith("tokenize_")]
    names = [n for n in cases if n not in big] or list(cases)
    statuses: dict[str, Counter] = {n: Counter() for n in cases}
    bad: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + duration_s

    def worker(k: int) -> None:
        rng = random.Random(k)
        with httpx.Client(base_url=url, timeout=60) as c:
            turn = 0
            while time.monotonic() < deadline:
                turn += 1
                name = big[(k // 2 + turn) % len(big)] if k % 2 == 0 and big else rng.choice(names)
                try:
                    status, body = cases[name](c)
                except httpx.HTTPError as exc:
                    status, body = 0, repr(exc).encode()
                ok = 400 <= status < 500 or status == 299
                if ok and status != 299:
                    try:
                        ok = set(json.loads(body)) == {"error"}
                    except ValueError:
                        ok = False
                with lock:
                    statuses[name][status] += 1
                    if not ok:
                        bad.append(f"{name}: {status} {body[:200]!r}")

    probe = Probe(url).start()
    pool = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(duration_s + 120)
    samples = probe.stop()
    with httpx.Client(base_url=url, timeout=60) as c:
        alive = c.get("/health").status_code == 200
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 2})
        serves = r.status_code == 200 and len(r.json()["choices"]) == 1
    return {
        "samples": samples,
        "probe_failures": probe.failures,
        "statuses": {n: {str(k): v for k, v in sorted(c.items())} for n, c in statuses.items()},
        "bad": bad,
        "alive_after": alive and serves,
    }


# ---- SIGKILL during feedback writes --------------------------------------------------------------------------------
def feedback_ids_on_disk(training_dir: Path) -> set[str]:
    """Every feedback id in the worker's log, read with the worker's own frame scanner (read-only)."""
    from lorafleet.worker.feedback.log import scan

    path = training_dir / "feedback.log"
    data = path.read_bytes() if path.exists() else b""
    return {json.loads(payload)["feedback_id"] for _, _, payload in scan(data).records}


def crash_case(fx: Fixture, server: Server, rng: random.Random, writers: int = 4) -> tuple[Server, int, int]:
    """Writers post feedback until a SIGKILL after a random number of acknowledgements (plus a random few ms, so it
    lands inside a write as often as between two); returns (restarted server, acknowledged, lost)."""
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def write(k: int) -> None:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            i = 0
            while not stop.is_set():
                i += 1
                body = {"adapter": ADAPTER, "kind": "pair", "prompt": f"q{k}-{i} " * 20, "completion": f" a{i} " * 20}
                try:
                    r = c.post("/v1/feedback", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
                except httpx.HTTPError:
                    return  # the worker is gone; this write was never acknowledged
                if r.status_code == 202:
                    with lock:
                        acked.append(r.json()["feedbackId"])

    pool = [threading.Thread(target=write, args=(k,), daemon=True) for k in range(writers)]
    for t in pool:
        t.start()
    target = rng.randint(5, 80)  # a kill at a random write, not before the first (a loaded machine starts slowly)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with lock:
            if len(acked) >= target:
                break
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.05))
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(30)
    stop.set()
    for t in pool:
        t.join(15)
    server.stop()  # closes its log file; the group is gone already
    restarted = fx.start()  # recovery of the log runs as the worker opens it
    on_disk = feedback_ids_on_disk(fx.training_dir)
    with lock:
        lost = sum(1 for fid in acked if fid not in on_disk)
        return restarted, len(acked), lost


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=20.0, help="seconds of hostile load")
    p.add_argument("--idle", type=float, default=4.0, help="seconds of the no-load /health baseline")
    p.add_argument("--threads", type=int, default=8, help="hostile client threads (half tokenize 1 MiB prompts)")
    p.add_argument("--cases", nargs="*", default=None, help="only these hostile cases (default: all)")
    p.add_argument("--crash-cases", type=int, default=4)
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--out", type=Path, default=RESULTS / "worker_hostile.json")
    args = p.parse_args(argv)
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="worker-hostile-") as tmp:
        fx = Fixture(Path(tmp))
        server = fx.start()
        startup_s = round(server.startup_s or 0.0, 2)
        load = {"before_idle_probe": os.getloadavg()[0]}
        try:
            idle = Probe(server.url).run_for(args.idle)
            load["before_hostile_load"] = os.getloadavg()[0]
            hostile = run_hostile(server.url, args.duration, args.threads, args.cases)
            load["after_hostile_load"] = os.getloadavg()[0]
            print(f"hostile: {sum(len(v) for v in [hostile['samples']])} probes, bad answers {len(hostile['bad'])}")
            rng = random.Random(args.seed)
            acked_total, lost_total, cases = 0, 0, []
            for case in range(args.crash_cases):
                server, acked, lost = crash_case(fx, server, rng)
                acked_total += acked
                lost_total += lost
                cases.append({"case": case, "acknowledged": acked, "lost": lost})
                print(f"crash case {case}: {acked} acknowledged, {lost} lost")
        finally:
            server.stop()
        torn_files = len(list(fx.training_dir.glob("feedback.log.torn-*")))
    samples = hostile["samples"]
    metrics = {
        "health_p99_ms_under_hostile_load": round(percentile(samples, 0.99), 2),
        "health_p50_ms_under_hostile_load": round(statistics.median(samples), 2),
        "health_p99_ms_idle": round(percentile(idle, 0.99), 2),
        "health_p99_ratio_hostile_vs_idle": round(percentile(samples, 0.99) / max(percentile(idle, 0.99), 1e-9), 2),
        "health_probes_under_hostile_load": len(samples),
        "health_probe_failures": hostile["probe_failures"],
        "hostile_requests": sum(sum(c.values()) for c in hostile["statuses"].values()),
        "hostile_bad_answers": len(hostile["bad"]),
        "alive_and_serving_after_hostile_load": hostile["alive_after"],
        "feedback_records_lost_after_crash_cases": lost_total,
        "feedback_acknowledged_in_crash_cases": acked_total,
        "crash_cases": args.crash_cases,
    }
    result = {
        **provenance("worker_hostile.py", argv, "cpu"),
        "metrics": metrics,
        "targets": {"health_p99_ms_under_hostile_load": "< 100", "feedback_records_lost_after_crash_cases": "0"},
        "notes": {
            "statuses_by_case": hostile["statuses"],
            "bad_answers": hostile["bad"][:20],
            "crash_cases": cases,
            "torn_tails_copied_aside": torn_files,
            "worker_startup_s": startup_s,
            "cpu_cores": os.cpu_count(),
            "load_average": load,
            "hostile_threads": args.threads,
            "hostile_duration_s": args.duration,
            "wall_s": round(time.monotonic() - t_start, 1),
        },
    }
    write_result(args.out, result)
    print(json.dumps(metrics, indent=1))
    ok = metrics["feedback_records_lost_after_crash_cases"] == 0 and metrics["hostile_bad_answers"] == 0
    return 0 if ok and hostile["alive_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
