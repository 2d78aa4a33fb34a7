"""The worker's authorization model over a real server: every route, without a credential and with a wrong one.

The table below is the one in docs/worker-api.md; a route the app serves that is missing here fails the test, so
a new route cannot ship without someone deciding who may call it. Names and paths: hostile adapter and job names
are refused before anything is written, and symlinks that lead out of a root are refused for adapter files,
adapter directories, job version directories and checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from lorafleet.worker.api.testing import assert_openai_error

ADMIN, KEY, FEEDBACK = "admin-s3cret", "api-k3y", "fb-k3y"
SERVED = "tiny"

# (method, path) -> who may call it: admin token / API key (or admin) / feedback key (or admin) / anyone
ROUTES = {
    ("POST", "/v1/load_lora_adapter"): "admin",
    ("POST", "/v1/unload_lora_adapter"): "admin",
    ("GET", "/v1/adapters"): "admin",
    ("POST", "/v1/training/jobs"): "admin",
    ("GET", "/v1/training/jobs"): "admin",
    ("GET", "/v1/training/jobs/{name}"): "admin",
    ("DELETE", "/v1/training/jobs/{name}"): "admin",
    ("POST", "/v1/completions"): "api",
    ("POST", "/v1/chat/completions"): "api",
    ("GET", "/v1/models"): "api",
    ("GET", "/v1/models/{model_id:path}"): "api",
    ("POST", "/tokenize"): "api",
    ("POST", "/detokenize"): "api",
    ("POST", "/v1/feedback"): "feedback",
    ("GET", "/health"): "public",
    ("GET", "/ready"): "public",
    ("GET", "/version"): "public",
    ("GET", "/metrics"): "public",
}
CREDENTIAL = {"admin": ADMIN, "api": KEY, "feedback": FEEDBACK}


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model) -> Path:
    from lorafleet.worker.testing import build_peft_adapter

    r = tmp_path_factory.mktemp("sec-adapters")
    build_peft_adapter(r / "good", tiny_model, rank=4, seed=5, std=0.1)
    return r


@pytest.fixture(scope="module")
def worker(tmp_path_factory, tiny_model, root):
    from lorafleet.worker.api.testing import start_worker

    train = tmp_path_factory.mktemp("sec-train")
    os.environ["LORAFLEET_TRAINING_DIR"] = str(train)
    try:
        w = start_worker(
            str(tiny_model),
            served_model_name=SERVED,
            admin_token=ADMIN,
            adapter_roots=[str(root)],
            block_size=4,
            num_kv_blocks=256,
            api={"api_key": KEY, "feedback_api_key": FEEDBACK},
        )
    finally:
        del os.environ["LORAFLEET_TRAINING_DIR"]
    w.train_dir = train
    yield w
    w.close()


@pytest.fixture(scope="module")
def client(worker):
    with httpx.Client(base_url=worker.url, timeout=60) as c:
        yield c


def _served_routes(app) -> set[tuple[str, str]]:
    """Every (method, path) the app routes, through included routers at any depth."""
    out: set[tuple[str, str]] = set()
    stack = list(app.routes)
    while stack:
        r = stack.pop()
        inner = getattr(r, "original_router", None) or getattr(r, "router", None)
        if inner is not None and not hasattr(r, "methods"):
            stack.extend(inner.routes)
        elif getattr(r, "methods", None) and getattr(r, "include_in_schema", True) is not None:
            out |= {(m, r.path) for m in r.methods if m != "HEAD"}
    return out


def _concrete(path: str) -> str:
    return path.replace("{name}", "j1").replace("{model_id:path}", SERVED)


def test_every_route_is_in_the_table(worker):
    assert _served_routes(worker.app) == set(ROUTES)


@pytest.mark.parametrize(("method", "path"), sorted(ROUTES))
def test_route_without_and_with_a_wrong_token(client, worker, method, path):
    who = ROUTES[(method, path)]
    url = _concrete(path)
    body = {} if method == "POST" else None
    files_before = sorted(p for p in worker.train_dir.rglob("*"))
    missing = client.request(method, url, json=body)
    wrong = client.request(method, url, json=body, headers={"Authorization": "Bearer wrong"})
    other = client.request(method, url, json=body, headers={"Authorization": "Basic " + ADMIN})  # not a bearer
    if who == "public":
        assert missing.status_code == 200 and wrong.status_code == 200, (missing.text, wrong.text)
        return
    if who == "admin":
        assert_openai_error(missing, 401, "AuthenticationError")
        assert missing.headers["www-authenticate"] == "Bearer"
        assert_openai_error(wrong, 403, "PermissionDeniedError")
        assert_openai_error(other, 401)
    else:
        for r in (missing, wrong, other):
            assert_openai_error(r, 401, "AuthenticationError")
        # another route class's credential is not this one's
        foreign = KEY if who == "feedback" else FEEDBACK
        assert_openai_error(client.request(method, url, json=body, headers=_auth(foreign)), 401)
    # none of them touched the disk
    assert sorted(p for p in worker.train_dir.rglob("*")) == files_before
    # the right credential passes the check (whatever the handler then says of the empty body)
    ok = client.request(method, url, json=body, headers=_auth(CREDENTIAL[who]))
    assert ok.status_code not in (401, 403), ok.text
    if who != "admin":  # the admin token is accepted everywhere, so the operator needs one credential
        assert client.request(method, url, json=body, headers=_auth(ADMIN)).status_code not in (401, 403)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_admin_without_configured_token_is_loopback_only(tiny_model):
    """No admin token configured: a loopback caller may administer, a caller from another host may not."""
    from lorafleet.worker.api.auth import require_admin
    from lorafleet.worker.api.errors import APIError
    from lorafleet.worker.api.settings import ApiSettings
    from starlette.requests import Request

    class _App:
        class state:  # noqa: N801 - mimics app.state
            settings = ApiSettings(served_model_name="m")

    def request(host: str) -> Request:
        return Request({"type": "http", "headers": [], "client": (host, 1234), "app": _App, "method": "POST"})

    require_admin(request("127.0.0.1"))
    require_admin(request("::1"))
    for host in ("10.0.0.7", "192.168.1.2", "testclient"):
        with pytest.raises(APIError) as err:
            require_admin(request(host))
        assert err.value.status == 403


HOSTILE_NAMES = ["..", ".", "a/b", "../escape", "x" * 10_000, "bad\nname", "\x1b[31mred", "Upper", "a_b", "-a", ""]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_adapter_names_are_refused_before_any_write(client, worker, root, name):
    before = sorted(p for p in root.parent.rglob("*"))
    r = client.post(
        "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(root / "good")}, headers=_auth(ADMIN)
    )
    assert_openai_error(r, 400)
    assert "\n" not in r.json()["error"]["message"] and "\x1b" not in r.json()["error"]["message"]
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=_auth(ADMIN))
    assert_openai_error(r, 400)
    r = client.post("/v1/training/jobs", json={"name": "j", "adapter": name}, headers=_auth(ADMIN))
    assert r.status_code == 422, r.text
    r = client.post("/v1/training/jobs", json={"name": name, "adapter": "good"}, headers=_auth(ADMIN))
    assert r.status_code == 422, r.text
    fb = {"kind": "pair", "adapter": name, "prompt": "p", "completion": " c"}
    assert client.post("/v1/feedback", json=fb, headers=_auth(FEEDBACK)).status_code in (400, 422)
    assert sorted(p for p in root.parent.rglob("*")) == before
    assert name not in client.get("/metrics").text or name in ("", ".", "-a")


@pytest.mark.parametrize("name", ["..", "Upper", "a_b", "x" * 64])
def test_hostile_job_names_in_the_path(client, name):
    for method in ("GET", "DELETE"):
        r = client.request(method, f"/v1/training/jobs/{name}", headers=_auth(ADMIN))
        assert r.status_code in (400, 404), r.text
        assert r.status_code == 400 or name == ".."  # ".." is normalised away by the client: another route
    assert client.get("/v1/training/jobs/nope", headers=_auth(ADMIN)).status_code == 404


def test_adapter_file_symlink_out_of_the_root_is_refused(client, root, tiny_model, tmp_path):
    from lorafleet.worker.testing import build_peft_adapter

    outside = build_peft_adapter(tmp_path / "outside", tiny_model, rank=4, seed=6, std=0.1)
    link = root / "linked-file"
    link.mkdir()
    (link / "adapter_config.json").write_bytes((outside / "adapter_config.json").read_bytes())
    (link / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    r = client.post(
        "/v1/load_lora_adapter", json={"lora_name": "linked-file", "lora_path": str(link)}, headers=_auth(ADMIN)
    )
    err = assert_openai_error(r, 400)
    assert "outside" in err["message"]
    (root / "linked-dir").symlink_to(outside, target_is_directory=True)
    r = client.post(
        "/v1/load_lora_adapter",
        json={"lora_name": "linked-dir", "lora_path": str(root / "linked-dir")},
        headers=_auth(ADMIN),
    )
    assert "outside" in assert_openai_error(r, 400)["message"]
    names = [a["name"] for a in client.get("/v1/adapters", headers=_auth(ADMIN)).json()["data"]]
    assert "linked-file" not in names and "linked-dir" not in names


def test_job_versions_and_checkpoints_behind_symlinks_are_refused(client, worker, root, tmp_path):
    """The versions directory of a job's adapter (in the adapter root) and its checkpoint directory must not be
    links out of their roots: a job for them is refused (400) and nothing is written where they point."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "vlinked").symlink_to(outside, target_is_directory=True)
    r = client.post("/v1/training/jobs", json={"name": "jv", "adapter": "vlinked"}, headers=_auth(ADMIN))
    assert "outside" in assert_openai_error(r, 400)["message"]
    ckpt = Path(worker.app.state.training.checkpoint_dir)
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "clinked").symlink_to(outside, target_is_directory=True)
    r = client.post("/v1/training/jobs", json={"name": "jc", "adapter": "clinked"}, headers=_auth(ADMIN))
    assert "outside" in assert_openai_error(r, 400)["message"]
    assert list(outside.iterdir()) == []
    assert not (root / "clinked").exists()  # refused before the job made its versions directory
    assert client.get("/v1/training/jobs", headers=_auth(ADMIN)).json()["jobs"] == []


def test_checkpoint_manifest_cannot_point_out_of_its_directory(tmp_path):
    import json

    from lorafleet.worker.training.checkpoint import CheckpointStore

    store = CheckpointStore(tmp_path / "ck", keep=3)
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"not yours")
    step = tmp_path / "ck" / "step-00000001"
    step.mkdir()
    manifest = {"format": 1, "step": 1, "tensors": {"file": "../../secret.safetensors", "bytes": 9}}
    (step / "state.json").write_text(json.dumps(manifest))
    res = store.load_latest()
    assert res.checkpoint is None
    assert len(res.corrupt) == 1 and "outside" in res.corrupt[0]["reason"]
    elsewhere = tmp_path / "elsewhere-ck"
    elsewhere.mkdir()
    (tmp_path / "ck" / "step-00000002").symlink_to(elsewhere, target_is_directory=True)
    res = store.load_latest()
    assert [c["step"] for c in res.corrupt] == [2, 1] and "outside" in res.corrupt[0]["reason"]


def test_adapter_version_symlink_out_of_the_root_is_refused(client, root, tiny_model, tmp_path):
    """A published version directory (`<root>/<adapter>/vN`) that links outside the root is not loaded when a
    job resumes from it."""
    from lorafleet.worker.testing import build_peft_adapter

    outside = build_peft_adapter(tmp_path / "v-outside", tiny_model, rank=4, seed=8, std=0.1)
    (root / "vres").mkdir()
    (root / "vres" / "v3").symlink_to(outside, target_is_directory=True)
    r = client.post("/v1/training/jobs", json={"name": "jr", "adapter": "vres"}, headers=_auth(ADMIN))
    assert "outside" in assert_openai_error(r, 400)["message"]
    assert "vres" not in [a["name"] for a in client.get("/v1/adapters", headers=_auth(ADMIN)).json()["data"]]


def test_feedback_only_for_adapters_with_a_job_and_labels_stay_bounded(client, worker, root):
    fb = {"kind": "pair", "adapter": "good", "prompt": "p", "completion": " c"}
    for i in range(150):
        r = client.post("/v1/feedback", json={**fb, "adapter": f"invented-{i}"}, headers=_auth(FEEDBACK))
        assert_openai_error(r, 404)
    assert_openai_error(client.post("/v1/feedback", json=fb, headers=_auth(FEEDBACK)), 404)  # no job yet
    assert worker.app.state.training.feedback is not None and len(worker.app.state.training.feedback) == 0
    job = {"name": "jg", "adapter": "good", "publish": {"everySteps": 1000}}
    assert client.post("/v1/training/jobs", json=job, headers=_auth(ADMIN)).status_code == 201
    r = client.post("/v1/feedback", json=fb, headers=_auth(FEEDBACK))
    assert r.status_code == 202 and r.json()["adapter"] == "good"
    assert client.delete("/v1/training/jobs/jg", headers=_auth(ADMIN)).status_code == 200
    metrics = client.get("/metrics").text
    series = [ln for ln in metrics.splitlines() if ln.startswith("lorafleet_feedback_total{")]
    assert 'lorafleet_feedback_total{adapter="good",result="accepted"} 1.0' in series
    assert not any("invented" in ln for ln in series)
    assert len(series) <= 4, series
