"""Per-adapter load of a stock vLLM worker from its /metrics text (tests/operator/data/vllm_metrics_*.txt).

The five scrapes are one worker's story in vLLM's exposition format (metric names, help texts and labels of vLLM's
Prometheus logger, rendered by prometheus-client as vLLM does): a, b 10 s apart under traffic on `sql` and `chat`;
c with the newest stamp tied between two combinations; d one step later; e idle with a stale series naming `sql`
at the newest stamp.
"""

from __future__ import annotations

import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from lorafleet.operator import vllm_load
from lorafleet.operator.scrape import WorkerLoad, parse_metrics

DATA = Path(__file__).parent / "data"


def scrape(name: str) -> WorkerLoad:
    return parse_metrics((DATA / f"vllm_metrics_{name}.txt").read_text())


def serve_metrics(names: list[str]) -> tuple[ThreadingHTTPServer, str]:
    """A real HTTP server answering GET /metrics with the recorded texts in turn (the last one from then on)."""
    pages = [(DATA / f"vllm_metrics_{n}.txt").read_bytes() for n in names]
    served: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = pages.pop(0) if len(pages) > 1 else pages[0]
            served.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.served = served  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_a_drain_through_the_vllm_client_ends_on_the_first_fresh_sample_not_before() -> None:
    """migration.wait_drained against a server whose scrapes go b (mark), b, c (tie), d (fresh, sql gone): it
    returns after exactly four scrapes; with e (idle server, stale series naming sql) it returns at once."""
    import asyncio

    from lorafleet.operator.migration import wait_drained
    from lorafleet.operator.workerclient import VLLMWorkerClient

    async def drain(names: list[str]) -> tuple[bool, int]:
        server, url = serve_metrics(names)
        client = VLLMWorkerClient(url, None)
        try:
            ok = await wait_drained(client, "sql", timeout=30.0, poll=0.0)
            return ok, len(server.served)  # type: ignore[attr-defined]
        finally:
            await client.aclose()
            server.shutdown()

    assert asyncio.run(drain(["b", "b", "c", "d"])) == (True, 4)
    assert asyncio.run(drain(["e"])) == (True, 2)  # the mark, then one answer: idle


def test_parse_reads_every_info_series_and_the_finished_request_counter() -> None:
    a, b = scrape("a"), scrape("b")
    assert a.requests_total == 100.0 and b.requests_total == 160.0  # stop + length + abort, not *_created
    assert len(b.lora_info) == 4 and b.max_lora == 4
    assert b.newest is not None and b.newest.running == {"chat"} and b.newest.waiting == {"sql"}
    assert b.lora_running == {"chat"} and b.lora_waiting == {"sql"}
    assert (b.running, b.waiting) == (1.0, 1.0)


def test_a_tied_newest_stamp_is_no_current_combination() -> None:
    c = scrape("c")
    assert c.newest is None and c.newest_ts == 1765000040.0
    assert c.lora_running == frozenset()
    # the server is busy: whatever the tied stamps name counts as possibly in flight
    assert vllm_load.in_flight("sql", c) == (1, 0) and vllm_load.in_flight("chat", c) == (1, 0)
    assert vllm_load.in_flight("other", c) == (0, 0)
    d = scrape("d")
    assert vllm_load.in_flight("sql", d) == (0, 0) and vllm_load.in_flight("chat", d) == (1, 0)


def test_shares_follow_the_combinations_stamped_in_the_interval() -> None:
    a, b = scrape("a"), scrape("b")
    prev = {(i.running, i.waiting): i.ts for i in a.lora_info}
    states = vllm_load.stamped_since(b, prev)
    assert sorted(sorted(s) for s in states) == [["chat", "sql"], ["chat", "sql"], ["sql"]]
    assert vllm_load.shares(states) == {"chat": 0.4, "sql": 0.6}
    # 60 requests finished in 10 s, shared 60/40
    assert vllm_load.interval_rates(60.0, 10.0, states) == pytest.approx({"chat": 2.4, "sql": 3.6})
    assert vllm_load.interval_rates(0.0, 10.0, states) == {}
    assert vllm_load.shares([frozenset()]) == {}  # base-model traffic only


def test_rate_tracker_smooths_like_the_worker_and_survives_a_counter_reset() -> None:
    tracker = vllm_load.RateTracker()
    assert tracker.update(scrape("a"), 100.0) == {}  # the first scrape only sets the baseline
    assert tracker.update(scrape("b"), 101.0) == {}  # under min_window_s: nothing new yet
    rates = tracker.update(scrape("b"), 110.0)
    w = 1 - math.exp(-10.0 / 30.0)
    assert rates == pytest.approx({"chat": 2.4 * w, "sql": 3.6 * w})
    # a restarted server: its counter begins again (100 < 160) and none of its series was stamped after the
    # previous scrape, so the 100 requests are credited to no adapter and the rates only decay
    later = tracker.update(scrape("a"), 120.0)
    keep = math.exp(-10.0 / 30.0)
    assert later == pytest.approx({k: v * keep for k, v in rates.items()})
    assert tracker.update(scrape("b"), 130.0)["sql"] > later["sql"] * keep  # traffic again: credited again
    # no traffic any more: the rates decay to nothing
    quiet = scrape("a")
    t = 120.0
    for _ in range(60):
        t += 10.0
        rates = tracker.update(quiet, t)
    assert rates == {}


def test_drain_trusts_only_a_fresh_unambiguous_sample_or_an_idle_server() -> None:
    b, c, d, e = scrape("b"), scrape("c"), scrape("d"), scrape("e")
    mark = b.newest_ts  # the first scrape of the drain
    assert not vllm_load.drained("sql", b, mark)  # b names sql waiting, and is not newer than the mark anyway
    assert not vllm_load.drained("sql", c, mark)  # a tie: sql may still run, the server is busy
    assert vllm_load.drained("sql", d, mark)  # one step later, unique and fresh, only chat runs
    assert not vllm_load.drained("chat", d, mark)
    assert not vllm_load.drained("sql", d, d.newest_ts)  # the same picture, not newer than the mark: no proof
    # idle server, a stale series naming sql at the newest stamp (the tie that once won): drained at once
    assert e.newest is None and vllm_load.drained("sql", e, mark) and vllm_load.drained("chat", e, e.newest_ts)
    assert vllm_load.drained("sql", WorkerLoad(), None)  # nothing exported, nothing running


def test_vllm_client_rates_feed_auto_replicas_and_the_rebalancer() -> None:
    """The vLLM client scrapes a real HTTP server serving the recorded texts; its rates reach `replicas.auto`
    (decide.views) and the rebalancer (plan_moves) exactly as our workers' `lorafleet_adapter_request_rate` does."""
    import asyncio

    from lorafleet.operator import decide
    from lorafleet.operator.autoscale import AutoScaler
    from lorafleet.operator.metrics import OperatorMetrics
    from lorafleet.operator.observe import Worker
    from lorafleet.operator.rebalancer import plan_moves
    from lorafleet.operator.state import OperatorConfig, Runtime
    from lorafleet.operator.workerclient import AdapterInfo, VLLMWorkerClient

    server, url = serve_metrics(["a", "b"])

    async def two_scrapes() -> dict[str, float]:
        client = VLLMWorkerClient(url, None)
        client.rates.min_window_s = 0.0
        client.rates.tau_s = 1e-9  # no smoothing: the interval's own rates
        try:
            await client.load_report()
            return (await client.load_report()).adapter_rate
        finally:
            await client.aclose()

    try:
        rates = asyncio.run(two_scrapes())
    finally:
        server.shutdown()
    # 60 finished requests shared 60/40 over the (real, tiny) interval between the two scrapes: the ratio is exact
    assert set(rates) == {"chat", "sql"} and rates["sql"] == pytest.approx(1.5 * rates["chat"])
    scale = 10.0 / rates["sql"]  # as if the interval had been 10 s: sql 10 req/s, chat 6.67 req/s
    load = WorkerLoad(adapter_rate={a: r * scale for a, r in rates.items()})

    bm = {"metadata": {"name": "m"}, "spec": {"replicas": 3, "engine": "vllm", "limits": {"maxAdapters": 4}}}
    bodies = [
        {"metadata": {"name": n}, "spec": {"baseModel": "m", "source": {"uri": "s3://b/x"}, "rank": 8,
                                            "replicas": {"min": 1, "max": 3, "auto": True}}}
        for n in ("sql", "chat", "idle")
    ]  # fmt: skip
    workers = [
        Worker("w0", None, None, "n0", None, False, adapters={a: AdapterInfo(a) for a in ("sql", "chat")}, load=load),
        Worker("w1", None, None, "n1", None, False, adapters={"idle": AdapterInfo("idle")}, load=WorkerLoad()),
        Worker("w2", None, None, "n2", None, False, adapters={}, load=WorkerLoad()),
    ]
    views = decide.views(
        bodies, bm, workers, 3, autoscaler=AutoScaler(4.0, 30.0), check_sources=False, rank_of=lambda b: None, now=0.0
    )
    assert {n: v.desired for n, v in views.items()} == {"sql": 3, "chat": 2, "idle": 1}  # ceil(rate / 4)

    rt = Runtime(config=OperatorConfig(), kube=None, metrics=OperatorMetrics())  # type: ignore[arg-type]
    from lorafleet.operator.fleet import BaseModelFleet

    fleet = BaseModelFleet(rt, "ns", "m")
    fleet.workers = workers
    fixed = [{**b, "spec": {**b["spec"], "replicas": {"min": 1}}} for b in bodies]
    out = plan_moves(fleet, {"metadata": {"name": "m"}, "spec": {"replicas": 3, "limits": {"maxAdapters": 4}}}, fixed)
    assert out is not None
    (adapter, src, dst), *more = out[1]
    assert src == "w0" and adapter in {"sql", "chat"} and dst in {"w1", "w2"}  # the hot vLLM worker sheds one
