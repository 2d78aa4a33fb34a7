"""Adapter and model sources against real servers: versitygw for s3://, a local hub for hf://, claim dirs for pvc://.

Every bad input (missing bucket or object, wrong credentials, checksum mismatch, pickle, a path outside the claim,
a truncated download, an unreachable endpoint) must raise a SourceError naming the source, leave nothing in the
cache, and leave the adapter's current version serving.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from lorafleet.worker.lora.adapter import read_adapter
from lorafleet.worker.lora.sources.cache import CacheKey, SourceCache
from lorafleet.worker.lora.sources.errors import SourceError
from lorafleet.worker.lora.sources.hubserver import HubServer
from lorafleet.worker.lora.sources.resolver import SourceResolver
from lorafleet.worker.lora.sources.uri import parse
from lorafleet.worker.lora.sources.verify import check_safetensors, select_files
from lorafleet.worker.lora.store import AdapterStore
from lorafleet.worker.models.llama import ModelShape


def tree_digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def upload(client, bucket: str, prefix: str, directory: Path) -> None:
    for p in sorted(directory.iterdir()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{p.name}", Body=p.read_bytes())


def samples(resolver: SourceResolver) -> dict[str, float]:
    """The resolver's metrics as Prometheus exposes them (name{labels} -> value)."""
    from prometheus_client import generate_latest

    out = {}
    for line in generate_latest(resolver.metrics.registry).decode().splitlines():
        if line and not line.startswith("#"):
            key, _, val = line.rpartition(" ")
            out[key] = float(val)
    return out


@pytest.fixture
def shape(tiny_model) -> ModelShape:
    from lorafleet.worker.loader import load_hf_config

    return ModelShape.from_hf(load_hf_config(tiny_model))


def make_store(shape, resolver: SourceResolver) -> AdapterStore:
    return AdapterStore(
        shape, torch.device("cpu"), torch.float32, max_slots=2, max_cpu=4, resolvers=resolver.adapter_resolvers()
    )


# ---- pure pieces ---------------------------------------------------------------------------------------------
def test_parse_uris() -> None:
    assert parse("s3://my-bucket/a/b/").where == "my-bucket" and parse("s3://my-bucket/a/b/").path == "a/b"
    hf = parse("hf://org/repo@refs/pr/1")
    assert (hf.where, hf.revision) == ("org/repo", "refs/pr/1")
    assert parse("hf://org/repo").revision is None
    assert parse("pvc://claim-1/x/y").where == "claim-1"
    for bad in ("s3://A_B/x", "hf://org", "hf://org/repo@", "pvc://Bad/x", "gs://b/x", "hf://org/repo@a/../b"):
        with pytest.raises(SourceError) as err:
            parse(bad)
        assert bad in str(err.value)


def test_select_files_refuses_pickle_and_skips_it_beside_safetensors() -> None:
    with pytest.raises(SourceError, match="only pickle weights"):
        select_files("s3://b/x", ["adapter_config.json", "adapter_model.bin"], "adapter")
    assert select_files(
        "s3://b/x", ["adapter_config.json", "adapter_model.bin", "adapter_model.safetensors"], "adapter"
    ) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    with pytest.raises(SourceError, match="only pickle weights"):
        select_files("hf://o/m", ["config.json", "pytorch_model.bin"], "model")
    assert "model.safetensors" in select_files("hf://o/m", ["config.json", "model.safetensors", "x.pt"], "model")


def test_safetensors_structure_check(adapters, tmp_path) -> None:
    src = adapters["ad-r4"] / "adapter_model.safetensors"
    assert check_safetensors("u", src) > 0
    data = src.read_bytes()
    for name, blob in (("short", data[:-7]), ("long", data + b"\0" * 8), ("tiny", data[:5])):
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(SourceError) as err:
            check_safetensors("s3://b/x", p)
        assert "s3://b/x" in str(err.value)


def test_cache_is_bounded_lru_and_keeps_protected(tmp_path) -> None:
    cache = SourceCache(tmp_path / "c", max_bytes=2500)
    keys = [CacheKey("s3", f"s3://b/{i}", "v1") for i in range(3)]
    paths = []
    for i, k in enumerate(keys):
        part = cache.partial(k)
        (part / "f").write_bytes(b"x" * 1000)
        paths.append(cache.commit(k, part))
        os.utime(paths[-1], (1000 + i, 1000 + i))
    assert cache.size_bytes() == 3000
    removed = cache.evict(protected=[paths[0]])
    assert removed == [paths[1]]  # the oldest unprotected one
    assert cache.lookup(keys[0]) == paths[0] and cache.lookup(keys[1]) is None
    assert not (tmp_path / "c" / ".partial" / keys[0].relpath).exists()  # committed by rename


# ---- s3:// through versitygw ---------------------------------------------------------------------------------
def test_s3_adapter_fetch_cache_and_reload(s3_env, adapters, shape, tmp_path) -> None:
    client = s3_env.client()
    upload(client, "adapters", "tenants/a", adapters["ad-r4"])
    resolver = SourceResolver(tmp_path / "cache", claim_root=tmp_path / "claims")
    store = make_store(shape, resolver)
    uri = "s3://adapters/tenants/a"
    path = resolver.fetch(uri)
    assert tree_digest(path) == tree_digest(adapters["ad-r4"])
    av = store.register("a", uri)
    assert av.uri == uri and av.path == path
    want = read_adapter(adapters["ad-r4"], shape, 64)
    assert av.digest == want.digest
    assert resolver.fetch(uri) == path  # a cache hit: same directory, no new download
    m = samples(resolver)
    assert m['lorafleet_source_fetches_total{result="downloaded",scheme="s3"}'] == 1
    assert m['lorafleet_source_fetches_total{result="cached",scheme="s3"}'] == 1
    assert m['lorafleet_source_download_bytes_total{scheme="s3"}'] == sum(p.stat().st_size for p in path.iterdir())
    assert m["lorafleet_source_download_pending_bytes"] == 0
    # new weights under the same prefix: a new version directory, the old one untouched
    upload(client, "adapters", "tenants/a", adapters["ad-r8"])
    path2 = resolver.fetch(uri)
    assert path2 != path and tree_digest(path2) == tree_digest(adapters["ad-r8"])
    assert store.register("a", uri).digest == read_adapter(adapters["ad-r8"], shape, 64).digest


def test_s3_download_resumes_from_a_partial_file(s3_env, adapters, tmp_path) -> None:
    client = s3_env.client()
    upload(client, "adapters", "resume/a", adapters["ad-r16rs"])
    resolver = SourceResolver(tmp_path / "cache")
    st = adapters["ad-r16rs"] / "adapter_model.safetensors"
    # an earlier attempt stopped half-way: the partial file is where the next attempt looks for it
    ref = parse("s3://adapters/resume/a")
    resolver._s3_client()
    objects = resolver.s3._listing(ref)
    digest = hashlib.sha256()
    for n in sorted(objects):
        digest.update(f"{n}\0{objects[n]['Size']}\0{objects[n].get('ETag', '')}\n".encode())
    key = CacheKey("s3", ref.uri, digest.hexdigest()[:20])
    half = st.stat().st_size // 2
    (resolver.cache.partial(key) / st.name).write_bytes(st.read_bytes()[:half])
    path = resolver.fetch(ref.uri)
    assert tree_digest(path) == tree_digest(adapters["ad-r16rs"])
    total = sum(p.stat().st_size for p in adapters["ad-r16rs"].iterdir())
    assert samples(resolver)['lorafleet_source_download_bytes_total{scheme="s3"}'] == total - half


def test_s3_bad_inputs_name_the_source_and_keep_the_current_version(s3_env, adapters, shape, tmp_path) -> None:
    client = s3_env.client()
    upload(client, "adapters", "good", adapters["ad-r4"])
    resolver = SourceResolver(tmp_path / "cache")
    store = make_store(shape, resolver)
    good = store.register("a", "s3://adapters/good")
    # checksum mismatch: the object's recorded sha256 is not its content's
    for p in sorted(adapters["ad-r8"].iterdir()):
        client.put_object(
            Bucket="adapters", Key=f"tampered/{p.name}", Body=p.read_bytes(), Metadata={"sha256": "0" * 64}
        )
    # pickle only
    client.put_object(
        Bucket="adapters",
        Key="pickle/adapter_config.json",
        Body=(adapters["ad-r4"] / "adapter_config.json").read_bytes(),
    )
    client.put_object(Bucket="adapters", Key="pickle/adapter_model.bin", Body=b"\x80\x04K\x01.")
    # truncated/corrupt safetensors (a whole object that is itself cut short)
    data = (adapters["ad-r4"] / "adapter_model.safetensors").read_bytes()
    client.put_object(
        Bucket="adapters", Key="cut/adapter_config.json", Body=(adapters["ad-r4"] / "adapter_config.json").read_bytes()
    )
    client.put_object(Bucket="adapters", Key="cut/adapter_model.safetensors", Body=data[: len(data) - 100])
    cases = {
        "s3://no-such-bucket/x": "bucket does not exist",
        "s3://adapters/missing": "no objects under this prefix",
        "s3://adapters/tampered": "checksum mismatch",
        "s3://adapters/pickle": "only pickle weights",
        "s3://adapters/cut": "safetensors",
    }
    for uri, why in cases.items():
        with pytest.raises(SourceError) as err:
            resolver.fetch(uri)
        assert uri in str(err.value) and why in str(err.value), str(err.value)
        with pytest.raises(SourceError):
            store.register("a", uri)
        assert store.current("a") is good  # the previous version keeps serving
    # nothing of the bad sources reached the cache: only the good version is there
    assert [tree_digest(p) for p in (tmp_path / "cache").glob("s3/*/*")] == [tree_digest(adapters["ad-r4"])]
    samples_now = samples(resolver)
    assert samples_now['lorafleet_source_fetches_total{result="failed",scheme="s3"}'] == 2 * len(cases)


def test_s3_wrong_credentials_and_unreachable_endpoint(s3, adapters, tmp_path, monkeypatch) -> None:
    upload(s3.client(), "adapters", "creds", adapters["ad-r4"])
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong" + s3.secret_key)
    with pytest.raises(SourceError, match="access denied") as err:
        SourceResolver(tmp_path / "c1").fetch("s3://adapters/creds")
    assert "s3://adapters/creds" in str(err.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{dead}")
    with pytest.raises(SourceError, match="unreachable") as err:
        SourceResolver(tmp_path / "c2").fetch("s3://adapters/creds")
    assert "s3://adapters/creds" in str(err.value)


def test_s3_truncated_download_is_never_loaded_and_the_retry_completes(cut_s3, adapters, shape, tmp_path, monkeypatch):
    """The connection drops half-way through an object (the headers announced all of it): the load fails naming the
    source, the previous version keeps serving, nothing is committed to the cache; the next load completes."""
    s3, proxy = cut_s3
    upload(s3.client(), "adapters", "whole", adapters["ad-r4"])
    upload(s3.client(), "adapters", "dropped", adapters["ad-r8"])
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    resolver = SourceResolver(tmp_path / "cache")
    store = make_store(shape, resolver)
    good = store.register("a", "s3://adapters/whole")
    size = (adapters["ad-r8"] / "adapter_model.safetensors").stat().st_size
    proxy.cut[b"GET /adapters/dropped/adapter_model.safetensors"] = size // 2
    with pytest.raises(SourceError) as err:
        store.register("a", "s3://adapters/dropped")
    assert proxy.cuts == 1
    assert "s3://adapters/dropped" in str(err.value) and "truncated download" in str(err.value), str(err.value)
    assert store.current("a") is good
    assert [tree_digest(p) for p in (tmp_path / "cache").glob("s3/*/*")] == [tree_digest(adapters["ad-r4"])]
    assert store.register("a", "s3://adapters/dropped").digest == read_adapter(adapters["ad-r8"], shape, 64).digest
    cached = sorted((tree_digest(p) for p in (tmp_path / "cache").glob("s3/*/*")), key=str)
    assert cached == sorted([tree_digest(adapters["ad-r4"]), tree_digest(adapters["ad-r8"])], key=str)


def test_publish_to_s3_round_trips(s3_env, adapters, tmp_path) -> None:
    resolver = SourceResolver(tmp_path / "cache")
    uri = resolver.publish(adapters["ad-r2qv"], "s3://adapters/versions/a/v3")
    meta = s3_env.client().head_object(Bucket="adapters", Key="versions/a/v3/adapter_model.safetensors")["Metadata"]
    st = adapters["ad-r2qv"] / "adapter_model.safetensors"
    assert meta["sha256"] == hashlib.sha256(st.read_bytes()).hexdigest()
    assert tree_digest(resolver.fetch(uri)) == tree_digest(adapters["ad-r2qv"])


# ---- hf:// through a local hub -------------------------------------------------------------------------------
@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)  # the test suite runs offline; this hub is local
    with HubServer(token="hf_test") as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_test")
        yield srv


def test_hf_adapter_revisions_and_model(hub, adapters, tiny_model, shape, tmp_path) -> None:
    c1 = hub.add_repo("org/adapter", adapters["ad-r4"])
    resolver = SourceResolver(tmp_path / "cache")
    store = make_store(shape, resolver)
    p1 = resolver.fetch("hf://org/adapter")
    assert tree_digest(p1) == tree_digest(adapters["ad-r4"])
    c2 = hub.add_repo("org/adapter", adapters["ad-r8"])
    assert c1 != c2
    assert tree_digest(resolver.fetch("hf://org/adapter")) == tree_digest(adapters["ad-r8"])  # main moved
    pinned = f"hf://org/adapter@{c1}"
    hub.repos["org/adapter"].files = {p.name: p.read_bytes() for p in adapters["ad-r4"].iterdir()}
    assert store.register("a", pinned).digest == read_adapter(adapters["ad-r4"], shape, 64).digest
    # a model repo: safetensors + config + tokenizer, the pickle copy skipped
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    hub.add_repo("org/tiny", model_dir)
    got = resolver.fetch("hf://org/tiny", "model")
    assert not (got / "pytorch_model.bin").exists()
    assert tree_digest(got) == {k: v for k, v in tree_digest(model_dir).items() if k != "pytorch_model.bin"}
    from lorafleet.worker.loader import load_hf_config

    assert load_hf_config(got).num_hidden_layers == shape.num_layers


def test_hf_bad_inputs(hub, adapters, shape, tmp_path, monkeypatch) -> None:
    hub.add_repo("org/good", adapters["ad-r4"])
    resolver = SourceResolver(tmp_path / "cache")
    store = make_store(shape, resolver)
    good = store.register("a", "hf://org/good")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapters["ad-r4"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    hub.add_repo("org/pickled", pickled)
    cases = {
        "hf://org/nothere": "repository not found",
        "hf://org/good@v9": "revision not found",
        "hf://org/pickled": "only pickle weights",
    }
    for uri, why in cases.items():
        with pytest.raises(SourceError) as err:
            store.register("a", uri)
        assert uri in str(err.value) and why in str(err.value), str(err.value)
        assert store.current("a") is good
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(SourceError, match="not found|access denied") as err:
        resolver.fetch("hf://org/good@main")
    assert "hf://org/good" in str(err.value)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    # truncated download: the connection closes part-way; nothing is committed, a retry completes it
    hub.add_repo("org/cut", adapters["ad-r8"])
    hub.truncate["adapter_model.safetensors"] = 200
    with pytest.raises(SourceError) as err:
        store.register("a", "hf://org/cut")
    assert "hf://org/cut" in str(err.value) and "truncated download" in str(err.value)
    assert store.current("a") is good
    assert [tree_digest(p) for p in (tmp_path / "cache").glob("hf/*/*")] == [tree_digest(adapters["ad-r4"])]
    hub.truncate.clear()
    assert store.register("a", "hf://org/cut").digest == read_adapter(adapters["ad-r8"], shape, 64).digest
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{dead}")
    with pytest.raises(SourceError, match="unreachable") as err:
        SourceResolver(tmp_path / "c2").fetch("hf://org/good")
    assert "hf://org/good" in str(err.value)


# ---- pvc:// --------------------------------------------------------------------------------------------------
def test_pvc_paths_stay_inside_their_claim(adapters, shape, tmp_path) -> None:
    claims = tmp_path / "claims"
    (claims / "models").mkdir(parents=True)
    shutil.copytree(adapters["ad-r4"], claims / "models" / "tenants" / "a")
    (claims / "other").mkdir()
    shutil.copytree(adapters["ad-r8"], claims / "other" / "b")
    (claims / "models" / "escape").symlink_to(claims / "other" / "b")
    resolver = SourceResolver(tmp_path / "cache", claim_root=claims)
    store = make_store(shape, resolver)
    good = store.register("a", "pvc://models/tenants/a")
    assert good.path == (claims / "models" / "tenants" / "a").resolve()
    cases = {
        "pvc://models/escape": "outside claim",
        "pvc://models/../other/b": "outside claim",
        "pvc://models/tenants/none": "does not exist",
        "pvc://unmounted/a": "not mounted",
    }
    for uri, why in cases.items():
        with pytest.raises(SourceError) as err:
            store.register("a", uri)
        assert uri in str(err.value) and why in str(err.value), str(err.value)
        assert store.current("a") is good
