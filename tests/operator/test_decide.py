"""The routing decision (decide.routing): who is listed in each adapter's EndpointSlice and who is released."""

from __future__ import annotations

from lorafleet.operator import decide
from lorafleet.operator.observe import Worker, pod_is_running
from lorafleet.operator.workerclient import AdapterInfo


def worker(pod: str, *adapters: str, terminating: bool = False, retiring: bool = False) -> Worker:
    return Worker(
        pod, None, "10.0.0.1", "n", None, draining=terminating or retiring,
        adapters={a: AdapterInfo(a) for a in adapters}, terminating=terminating, retiring=retiring,
    )  # fmt: skip


def views(*names: str, deleting: str | None = None) -> dict[str, decide.AdapterView]:
    out = {}
    for n in names:
        meta = {"name": n, **({"deletionTimestamp": "2026-01-01T00:00:00Z"} if n == deleting else {})}
        out[n] = decide.AdapterView(body={"metadata": meta, "spec": {}}, deleting=n == deleting)
    return out


def test_a_terminating_pod_is_never_routed_even_as_the_only_holder() -> None:
    ws = [worker("old", "a", "b", terminating=True), worker("new", "b")]
    r = decide.routing(views("a", "b"), ws, {"a": set(), "b": {"new"}}, [], set(), set())
    assert r.targets == {"a": [], "b": ["new"]}
    assert sorted(r.releases) == [("a", "old", "drain"), ("b", "old", "drain")]


def test_a_retiring_or_drained_pod_serves_until_a_replacement_exists() -> None:
    ws = [worker("victim", "a", "b", retiring=True), worker("keep", "b")]
    r = decide.routing(views("a", "b"), ws, {"a": set(), "b": {"keep"}}, [], set(), set())
    assert r.targets == {"a": ["victim"], "b": ["keep"]}
    assert r.releases == [("b", "victim", "drain")]
    # once the replacement loaded (it is in `current`), the victim is released
    r = decide.routing(views("a", "b"), ws, {"a": {"keep"}, "b": {"keep"}}, [], set(), set())
    assert r.targets == {"a": ["keep"], "b": ["keep"]} and sorted(r.releases) == [
        ("a", "victim", "drain"),
        ("b", "victim", "drain"),
    ]


def test_removes_are_unrouted_and_released_with_their_reason() -> None:
    ws = [worker("w0", "a", "gone"), worker("w1", "a")]
    current = {"a": {"w0", "w1"}, "gone": {"w0"}}
    r = decide.routing(views("a", "gone", deleting="gone"), ws, current, [("a", "w1")], set(), {("a", "w1")})
    assert r.targets == {"a": ["w0"], "gone": []}
    assert sorted(r.releases) == [("a", "w1", "scale-down"), ("gone", "w0", "deleted")]
    # a replica already draining is not released twice
    r = decide.routing(views("a"), ws, {"a": {"w0"}}, [("a", "w1")], {("a", "w1")}, set())
    assert r.releases == []


def test_not_ready_or_deleted_pods_are_not_running_workers() -> None:
    ready = {"type": "Ready", "status": "True"}
    pod = {"metadata": {"name": "p"}, "status": {"phase": "Running", "podIP": "10.0.0.2", "conditions": [ready]}}
    assert pod_is_running(pod)
    assert not pod_is_running({**pod, "status": {**pod["status"], "conditions": [{**ready, "status": "False"}]}})
    assert not pod_is_running({**pod, "metadata": {"name": "p", "deletionTimestamp": "2026-01-01T00:00:00Z"}})
    assert not pod_is_running({**pod, "status": {**pod["status"], "podIP": None}})


def test_reload_compares_store_uris_as_they_are() -> None:
    """A replica on `s3://b/v1` reloads to `s3://b/v2`; a local path is compared normalised, `s3:/b/v2` (what
    normpath makes of the URI) is another location than `s3://b/v2`."""
    assert decide.reload_path("s3://b/a/versions/v1", "s3://b/a/versions/v2")
    assert not decide.reload_path("s3://b/a/versions/v2", "s3://b/a/versions/v2")
    assert decide.reload_path("s3:/b/a/versions/v2", "s3://b/a/versions/v2")
    assert not decide.reload_path("/var/lib//adapters/a/../b/", "/var/lib/adapters/b")
    assert not decide.reload_path(None, "s3://b/a/versions/v2")
