"""Continual-learning versions published to the adapter's store (`sources/publish.py`, `sources/layout.py`).

Against a real S3 server (versitygw) and claim directories: a version is readable only once its manifest is written,
its bytes are checked against it, versions are never overwritten, and a failed upload is retried while no path is
reported for it. End to end with two real `lorafleet worker` processes: worker A trains an adapter it loaded from
S3 and publishes versions there, worker B (which never trained, with its own adapter root) loads each version by its
store URI and serves the same bytes; a half-uploaded version is refused, and B keeps its previous version serving
while the store is down.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from lorafleet.worker.api.testing import wait_for
from lorafleet.worker.lora.sources.errors import SourceError
from lorafleet.worker.lora.sources.layout import (
    MANIFEST,
    build_manifest,
    manifest_bytes,
    parse_manifest,
    split_version,
    version_uri,
)
from lorafleet.worker.lora.sources.publish import (
    AdapterPublisher,
    ClaimVersionStore,
    S3VersionStore,
    VersionSink,
    store_base,
)
from lorafleet.worker.lora.sources.resolver import SourceResolver
from lorafleet.worker.lora.sources.s3server import S3Server


def digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


# ---- pure pieces ---------------------------------------------------------------------------------------------
def test_version_layout_and_manifest(adapters) -> None:
    assert split_version("s3://b/tenants/a/versions/v12") == ("s3://b/tenants/a", 12)
    assert split_version("s3://b/tenants/a/versions/v12/") == ("s3://b/tenants/a", 12)
    assert split_version("s3://b/tenants/a") == ("s3://b/tenants/a", None)
    for not_a_version in ("s3://b/a/versions/v0", "s3://b/a/versions/v1x", "s3://b/a/v3", "s3://b/versions/v"):
        assert split_version(not_a_version)[1] is None
    assert version_uri("pvc://claim/a/", 3) == "pvc://claim/a/versions/v3"
    m = build_manifest(adapters["ad-r4"], 3)
    assert m["version"] == 3 and set(m["files"]) == {p.name for p in adapters["ad-r4"].iterdir()}
    assert parse_manifest("u", manifest_bytes(m)) == m["files"]
    bad_entries = (
        b"not json",
        b"[]",
        json.dumps({"format": 2, "files": {}}).encode(),
        json.dumps({"format": 1, "files": {}}).encode(),
        json.dumps({"format": 1, "files": {"../x": {"size": 1, "sha256": "0" * 64}}}).encode(),
        json.dumps({"format": 1, "files": {"a.json": {"size": -1, "sha256": "0" * 64}}}).encode(),
        json.dumps({"format": 1, "files": {"a.json": {"size": True, "sha256": "0" * 64}}}).encode(),
        json.dumps({"format": 1, "files": {"a.json": {"size": 1, "sha256": "xyz"}}}).encode(),
    )
    for raw in bad_entries:
        with pytest.raises(SourceError) as err:
            parse_manifest("s3://b/a/versions/v1", raw)
        assert str(err.value).startswith("s3://b/a/versions/v1: ")


def test_store_base_follows_the_source_and_the_recorded_store(tmp_path) -> None:
    vdir = tmp_path / "adapters" / "a"
    assert store_base("s3://b/t/a/versions/v4", vdir) == "s3://b/t/a"
    assert store_base("pvc://c/t/a", vdir) == "pvc://c/t/a"
    assert store_base("hf://org/repo", vdir) is None
    assert store_base(None, vdir) is None
    vdir.mkdir(parents=True)
    (vdir / ".lorafleet-store.json").write_text(json.dumps({"base": "s3://b/t/a"}))
    assert store_base(str(vdir / "v2"), vdir) == "s3://b/t/a"  # a restarted worker resumed from its own version
    assert store_base(None, vdir) == "s3://b/t/a"
    assert store_base(str(tmp_path / "elsewhere"), vdir) is None  # a user's local adapter is no store
    assert store_base("hf://org/a", vdir) is None  # whatever was recorded: the adapter comes from the hub now


# ---- S3 ------------------------------------------------------------------------------------------------------
def test_s3_version_is_readable_only_once_whole(s3_env, adapters, tmp_path) -> None:
    client = s3_env.client()
    store = S3VersionStore(client, "s3://adapters/pub/a")
    uri = store.write(adapters["ad-r4"], 1)
    assert uri == "s3://adapters/pub/a/versions/v1" and store.versions() == {1: True}
    got = SourceResolver(tmp_path / "reader").fetch(uri)
    assert digests(got) == digests(adapters["ad-r4"])
    assert store.write(adapters["ad-r4"], 1) == uri  # the same bytes again: already there
    with pytest.raises(SourceError, match="never overwritten"):
        store.write(adapters["ad-r8"], 1)
    assert digests(SourceResolver(tmp_path / "reader2").fetch(uri)) == digests(adapters["ad-r4"])

    # half-uploaded: every file but no manifest yet -> refused, nothing cached
    for p in sorted(adapters["ad-r8"].iterdir()):
        client.put_object(Bucket="adapters", Key=f"pub/a/versions/v2/{p.name}", Body=p.read_bytes())
    assert store.versions() == {1: True, 2: False}
    cache = tmp_path / "half"
    with pytest.raises(SourceError, match="not completely published") as err:
        SourceResolver(cache).fetch("s3://adapters/pub/a/versions/v2")
    assert str(err.value).startswith("s3://adapters/pub/a/versions/v2: ")
    with pytest.raises(SourceError, match="not completely published"):
        SourceResolver(cache).fetch("s3://adapters/pub/a/versions/v3")  # nothing there at all

    # a manifest whose checksum does not match the object: refused, the previous download stays as it was
    m = build_manifest(adapters["ad-r8"], 2)
    m["files"]["adapter_model.safetensors"]["sha256"] = "0" * 64
    client.put_object(Bucket="adapters", Key=f"pub/a/versions/v2/{MANIFEST}", Body=manifest_bytes(m))
    with pytest.raises(SourceError, match="checksum mismatch"):
        SourceResolver(cache).fetch("s3://adapters/pub/a/versions/v2")
    # a manifest naming a file the store does not have
    m = build_manifest(adapters["ad-r8"], 2)
    m["files"]["extra.json"] = {"size": 2, "sha256": "0" * 64}
    client.put_object(Bucket="adapters", Key=f"pub/a/versions/v2/{MANIFEST}", Body=manifest_bytes(m))
    with pytest.raises(SourceError, match="extra.json: listed in"):
        SourceResolver(cache).fetch("s3://adapters/pub/a/versions/v2")
    # the base source (the adapter the versions grew from) still reads as a plain adapter beside its versions
    for p in sorted(adapters["ad-r2qv"].iterdir()):
        client.put_object(Bucket="adapters", Key=f"pub/a/{p.name}", Body=p.read_bytes())
    assert digests(SourceResolver(tmp_path / "base").fetch("s3://adapters/pub/a")) == digests(adapters["ad-r2qv"])
    assert not (cache / "s3").exists()  # no refused version ever reached the cache


def test_failed_upload_reports_no_path_and_is_retried(s3_env, adapters, tmp_path) -> None:
    client = s3_env.client()
    store = S3VersionStore(client, "s3://later-bucket/a")  # the bucket does not exist yet
    pub = AdapterPublisher("a", store, retry=(0.05,))
    try:
        pub.submit(1, adapters["ad-r4"])
        assert wait_for(lambda: pub.api({"version": 1, "path": "/local"})["store"]["state"] == "failed", 30, 0.02)
        entry = pub.api({"version": 1, "path": "/local/a/v1"})
        assert entry["path"] == "" and "bucket does not exist" in entry["store"]["error"]
        assert "v1 is not in the store yet" in pub.note("") and "bucket does not exist" in pub.note("")
        assert pub.note("training").startswith("training; ")
        client.create_bucket(Bucket="later-bucket")
        assert pub.wait(1, 30)
        assert pub.api({"version": 1, "path": "/local/a/v1"})["path"] == "s3://later-bucket/a/versions/v1"
        assert pub.note("training") == "training"
    finally:
        pub.close()
    got = SourceResolver(tmp_path / "c").fetch("s3://later-bucket/a/versions/v1")
    assert digests(got) == digests(adapters["ad-r4"])
    # a publisher that did not know v1 exists (no listing): the conflict is given up at once, the next version goes on
    pub = AdapterPublisher("a", store, retry=(0.05,))
    try:
        pub.submit(1, adapters["ad-r8"])
        pub.submit(2, adapters["ad-r8"])
        assert pub.wait(2, 30)
        entry = pub.api({"version": 1})
        assert entry["path"] == "" and entry["store"]["state"] == "failed" and "never overwritten" in pub.note("")
    finally:
        pub.close()
    assert digests(SourceResolver(tmp_path / "d").fetch("s3://later-bucket/a/versions/v1")) == digests(
        adapters["ad-r4"]
    )


def test_sink_numbers_on_from_the_store_and_uploads_leftover_versions(s3_env, adapters, tmp_path) -> None:
    client = s3_env.client()
    S3VersionStore(client, "s3://adapters/sink/a").write(adapters["ad-r4"], 4)
    resolver = SourceResolver(tmp_path / "cache")
    vdir = tmp_path / "root" / "a"
    sink = VersionSink(resolver)
    try:
        pub = sink.bind("a", "s3://adapters/sink/a/versions/v4", vdir)
        assert pub is not None and pub.newest() == 4  # a job on a fresh worker publishes v5 next, never v1
        assert json.loads((vdir / ".lorafleet-store.json").read_text()) == {"base": "s3://adapters/sink/a"}
        shutil.copytree(adapters["ad-r8"], vdir / "v5")  # saved, then the process stopped before its upload
    finally:
        sink.close()
    sink = VersionSink(resolver)
    try:
        pub = sink.bind("a", str(vdir / "v5"), vdir)  # restarted: resumed from its own newest version
        assert pub is not None and pub.wait(5, 30)
        assert sink.bind("a", str(vdir / "v5"), vdir) is pub
    finally:
        sink.close()
    assert digests(resolver.fetch("s3://adapters/sink/a/versions/v5")) == digests(adapters["ad-r8"])
    assert VersionSink(resolver).bind("a", "hf://org/a", vdir) is None


# ---- pvc:// (a claim mounted writable) --------------------------------------------------------------------
def test_claim_versions_are_renamed_into_place_and_checked(adapters, tmp_path) -> None:
    claims = tmp_path / "claims"
    (claims / "shared" / "t" / "a").mkdir(parents=True)
    resolver = SourceResolver(tmp_path / "cache", claim_root=claims)
    sink = VersionSink(resolver)
    pub = sink.bind("a", "pvc://shared/t/a", tmp_path / "root" / "a")
    assert isinstance(pub.store, ClaimVersionStore)
    pub.submit(1, adapters["ad-r4"])
    assert pub.wait(1, 30)
    sink.close()
    v1 = digests(resolver.fetch("pvc://shared/t/a/versions/v1"))
    assert v1.pop(MANIFEST) and v1 == digests(adapters["ad-r4"])
    assert [p.name for p in (claims / "shared" / "t" / "a" / "versions").iterdir()] == ["v1"]  # no temp left
    half = claims / "shared" / "t" / "a" / "versions" / "v2"
    shutil.copytree(adapters["ad-r8"], half)
    with pytest.raises(SourceError, match="not completely published"):
        resolver.fetch("pvc://shared/t/a/versions/v2")
    (half / MANIFEST).write_bytes(manifest_bytes(build_manifest(adapters["ad-r4"], 2)))  # other bytes than listed
    with pytest.raises(SourceError, match="differs from|bytes, "):
        resolver.fetch("pvc://shared/t/a/versions/v2")


# ---- two real workers ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """A `lorafleet worker` process, as a pod runs it, with its own adapter root and source cache."""

    def __init__(self, tiny_model: Path, home: Path, env: dict[str, str]) -> None:
        self.root, self.cache, self.port = home / "adapters", home / "cache", free_port()
        self.root.mkdir(parents=True)
        cmd = [
            sys.executable, "-m", "lorafleet.cli", "worker", "--model", str(tiny_model), "--served-model-name", "tiny",
            "--host", "127.0.0.1", "--port", str(self.port), "--adapter-root", str(self.root),
            "--source-cache", str(self.cache), "--feedback-adapter", "*", "--max-batched-tokens", "64",
            "--max-loras", "2", "--max-lora-rank", "16", "--num-kv-blocks", "128", "--max-num-seqs", "4",
        ]  # fmt: skip
        self.log = home / "worker.log"
        full = {**os.environ, **env, "OMP_NUM_THREADS": "1", "LORAFLEET_WORKER_ID": home.name}
        full.pop("LORAFLEET_TRAINING_DIR", None)
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full)
        self.c = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            return self.c.get("/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def load(self, name: str, path: str, inplace: bool = False) -> httpx.Response:
        return self.c.post(
            "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path, "load_inplace": inplace}
        )

    def text(self, model: str) -> str:
        r = self.c.post("/v1/completions", json={"model": model, "prompt": "question 3: colour?", "max_tokens": 6,
                                                 "temperature": 0})  # fmt: skip
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    def job(self, name: str) -> dict:
        return self.c.get(f"/v1/training/jobs/{name}").json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


def start_job(w: Worker, name: str, steps: int) -> None:
    """A job on adapter `cl` whose one version is published at its last step."""
    for i in range(8):
        body = {"kind": "pair", "adapter": "cl", "prompt": f"question {i}: colour?", "completion": f" blue {i % 3}"}
        assert w.c.post("/v1/feedback", json=body).status_code == 202
    job = {
        "name": name,
        "adapter": "cl",
        "optimizer": {"lr": 0.05, "gradAccumulation": 1, "maxSteps": steps},
        "publish": {"everySteps": 1000, "maxLossSpike": 1000.0},
        "feedback": {"epochs": 20},
    }
    r = w.c.post("/v1/training/jobs", json=job)
    assert r.status_code == 201, r.text


def finished(w: Worker, name: str) -> dict:
    st = wait_for(lambda: (s := w.job(name))["phase"] != "Running" and s, 300, 0.2)
    assert st["phase"] == "Succeeded", st
    return st


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_version_trained_on_one_worker_serves_from_the_store_on_another(tiny_model, adapters, tmp_path) -> None:
    root = tmp_path / "s3root"
    s3 = S3Server(root).start()
    a = b = None
    try:
        client = s3.client()
        client.create_bucket(Bucket="adapters")
        for p in adapters["ad-r8"].iterdir():
            client.put_object(Bucket="adapters", Key=f"tenants/cl/{p.name}", Body=p.read_bytes())
        a, b = Worker(tiny_model, tmp_path / "wa", s3.env()), Worker(tiny_model, tmp_path / "wb", s3.env())
        assert wait_for(a.ready, 180, 0.2) and wait_for(b.ready, 180, 0.2)
        for w in (a, b):
            assert w.load("cl", "s3://adapters/tenants/cl").status_code == 200

        # worker A trains; its version goes to the adapter's store, and the status names it there once whole
        start_job(a, "cl-1", 3)
        st = finished(a, "cl-1")
        v1 = st["publishedVersions"][-1]
        assert v1["version"] == 1 and v1["store"]["uri"] == "s3://adapters/tenants/cl/versions/v1"
        st = wait_for(lambda: (s := a.job("cl-1"))["publishedVersions"][-1]["path"] and s, 60, 0.1)
        uri = st["publishedVersions"][-1]["path"]
        assert uri == "s3://adapters/tenants/cl/versions/v1" and st["publishedVersions"][-1]["store"]["state"] == (
            "published"
        )
        local_v1 = a.root / "cl" / "v1"
        # worker B never trained and cannot see A's files: it loads the version by its store URI
        r = b.load("cl", uri, inplace=True)
        assert r.status_code == 200, r.text
        listed = {x["name"]: x for x in b.c.get("/v1/adapters").json()["data"]}
        assert listed["cl"]["path"] == uri
        fetched = [p.parent for p in b.cache.rglob("adapter_model.safetensors")]
        got = next(d for d in fetched if (d / "lorafleet_version.json").exists())
        assert digests(got) == digests(local_v1)  # byte for byte what A published
        assert b.text("cl") == a.text("cl")
        served = b.text("cl")

        # a half-uploaded version (no manifest) is never loaded; B keeps serving v1
        for p in sorted(adapters["ad-r4"].iterdir()):
            client.put_object(Bucket="adapters", Key=f"tenants/cl/versions/v7/{p.name}", Body=p.read_bytes())
        r = b.load("cl", "s3://adapters/tenants/cl/versions/v7", inplace=True)
        assert r.status_code == 400 and "not completely published" in r.text, r.text
        assert b.text("cl") == served

        # the store goes down while the next job trains: its version stays unreported (no path) and says why; B's
        # load of it fails with the source named, and B keeps serving v1
        assert a.c.delete("/v1/training/jobs/cl-1").status_code == 200
        start_job(a, "cl-2", 30)
        s3.stop()
        st = finished(a, "cl-2")
        assert [v["version"] for v in st["publishedVersions"]][-1] == 8  # numbered past everything in the store
        st = wait_for(lambda: (s := a.job("cl-2"))["publishedVersions"][-1]["store"]["state"] == "failed" and s, 60)
        entry = st["publishedVersions"][-1]
        assert entry["path"] == "" and "unreachable" in entry["store"]["error"], entry
        assert "v8 is not in the store yet" in st["message"]
        r = b.load("cl", "s3://adapters/tenants/cl/versions/v8", inplace=True)
        assert r.status_code == 400 and "s3://adapters/tenants/cl/versions/v8" in r.text, r.text
        assert b.text("cl") == served

        # the store is back (same endpoint, same data): A's upload is retried, B rolls forward to v8
        back = S3Server(root)
        back.port, back.access_key, back.secret_key = s3.port, s3.access_key, s3.secret_key
        s3 = back.start()
        st = wait_for(lambda: (s := a.job("cl-2"))["publishedVersions"][-1]["path"] and s, 90, 0.2)
        assert st["publishedVersions"][-1]["path"] == "s3://adapters/tenants/cl/versions/v8"
        assert "not in the store" not in st["message"]
        r = b.load("cl", "s3://adapters/tenants/cl/versions/v8", inplace=True)
        assert r.status_code == 200, r.text
        assert b.text("cl") == a.text("cl")
        page = a.c.get("/metrics").text
        assert 'lorafleet_source_publishes_total{result="published",scheme="s3"} 2.0' in page
        assert 'lorafleet_source_publishes_total{result="failed",scheme="s3"}' in page
    finally:
        for w in (a, b):
            if w is not None:
                w.stop()
        s3.stop()
