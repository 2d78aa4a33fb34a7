"""The operator and worker images that hack/images.sh builds (mmdebstrap + buildah, docs/images.md), started from the
built image as a runtime starts them: a container from the image, its entry point run with `buildah run --isolation
chroot` as the image's user. The operator logs in to the test run's real kube-apiserver and answers /healthz; a CPU
worker loads a tiny model from a mounted directory, turns /ready and serves a completion.

The build is cached by content (CI's `images` stage builds it, these tests find it). CI must run these tests: they
skip only off CI, where the tools cannot run (not root and no buildah/mmdebstrap, or no uv)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from packaging.utils import canonicalize_name

from lorafleet.controlplane import ControlPlane

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "hack" / "images.sh"
# A cold build (a fresh machine: Debian packages, GBs of torch/CUDA wheels into the worker image) takes minutes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def uv_available() -> bool:
    """Where hack/images.sh looks: $LORAFLEET_UV, next to the Python it is given (this one), PATH."""
    explicit = os.environ.get("LORAFLEET_UV")
    python = Path(os.environ.get("LORAFLEET_PYTHON", sys.executable))
    return Path(explicit).exists() if explicit else bool((python.parent / "uv").exists() or shutil.which("uv"))


def why_not_buildable() -> str | None:
    tools = shutil.which("buildah") and shutil.which("mmdebstrap")
    if not tools and os.geteuid() != 0:
        return "buildah and mmdebstrap are not installed and installing them (apt-get) needs root"
    if not tools and not shutil.which("apt-get"):
        return "buildah and mmdebstrap are not installed and there is no apt-get to install them"
    if not uv_available():
        return "uv is not installed next to this Python or on PATH"
    return None


def spec(name: str) -> dict:
    return json.loads(subprocess.run(["bash", str(SCRIPT), "spec", name], capture_output=True, check=True).stdout)


@pytest.fixture(scope="session")
def images() -> dict[str, dict]:
    """Builds both images (a cache hit when CI's stage or an earlier run built the same content)."""
    reason = why_not_buildable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must build and start the images, but {reason}")
        pytest.skip(reason)
    # The wheel (so the content key) depends on the Python that builds it: $LORAFLEET_PYTHON when set, else this one,
    # which is what CI's images stage passes too.
    env = {"LORAFLEET_PYTHON": sys.executable, **os.environ}
    out = subprocess.run(["bash", str(SCRIPT), "build"], capture_output=True, text=True, env=env, cwd="/")
    assert out.returncode == 0, out.stderr[-6000:]
    return {d["name"]: d for d in map(json.loads, out.stdout.splitlines())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inspect(image: dict) -> dict:
    """The image's OCI config (entry point, user, env, labels, ...), read from the store."""
    out = subprocess.run([*image["buildah"], "inspect", "--type", "image", image["ref"]], capture_output=True, cwd="/")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["OCIv1"]["config"]


def containers_in(buildah: list[str]) -> list[str]:
    out = subprocess.run(
        [*buildah, "containers", "--noheading", "--format", "{{.ContainerName}}"],
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def remove_orphans(buildah: list[str]) -> None:
    """Containers of test runs that were killed before their teardown (named after their pytest's pid): each is a full
    copy of its image under vfs, GBs that nothing else removes."""
    for name in containers_in(buildah):
        m = re.fullmatch(r"lorafleet-test-\w+-(\d+)-[0-9a-f]{8}", name)
        if m and not psutil.pid_exists(int(m[1])):
            subprocess.run([*buildah, "rm", name], capture_output=True, cwd="/")


class Container:
    """A container of a built image; `start` runs the image's entry point with arguments, as a runtime does."""

    def __init__(self, image: dict) -> None:
        self.buildah, self.config = image["buildah"], inspect(image)
        self.name = f"lorafleet-test-{image['name']}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        subprocess.run([*self.buildah, "from", "--pull-never", "--name", self.name, image["ref"]], check=True, cwd="/")

    def remove(self) -> None:
        subprocess.run([*self.buildah, "rm", self.name], capture_output=True, cwd="/")

    def _run_argv(self, volumes: dict[Path, str], env: dict[str, str]) -> list[str]:
        argv = [*self.buildah, "run", "--isolation", "chroot"]
        for host, inside in volumes.items():
            argv += ["--volume", f"{host}:{inside}"]
        for key, value in env.items():
            argv += ["--env", f"{key}={value}"]
        return [*argv, self.name, "--"]

    def python(self, code: str) -> str:
        """Runs the image's python (not its entry point) as the image's user; its stdout."""
        out = subprocess.run([*self._run_argv({}, {}), "python", "-c", code], capture_output=True, text=True, cwd="/")
        assert out.returncode == 0, out.stderr
        return out.stdout

    def start(self, args: list[str], log: Path, volumes: dict[Path, str] | None = None, **env: str) -> subprocess.Popen:
        argv = [*self._run_argv(volumes or {}, env), *self.config["Entrypoint"], *args]
        with open(log, "w") as f:
            return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd="/")


@pytest.fixture(scope="module")
def containers(images: dict[str, dict]) -> Iterator[dict[str, Container]]:
    """One container per image, made on first use (vfs copies the whole image into each container)."""
    made: dict[str, Container] = {}
    remove_orphans(next(iter(images.values()))["buildah"])

    class Lazy(dict):
        def __missing__(self, name: str) -> Container:
            made[name] = self[name] = Container(images[name])
            return made[name]

    try:
        yield Lazy()
    finally:
        for c in made.values():
            c.remove()


def entry_point_process(runner: subprocess.Popen) -> psutil.Process:
    """The entry point itself, below buildah's chroot helper (buildah kills it on SIGTERM instead of forwarding)."""
    for _ in range(100):
        for child in psutil.Process(runner.pid).children(recursive=True):
            if "lorafleet" in " ".join(child.cmdline()) and "buildah" not in child.name():
                return child
        time.sleep(0.1)
    raise AssertionError("the entry point did not start")


def stop(runner: subprocess.Popen, log: Path) -> int:
    """SIGTERM to the entry point, as the kubelet sends it; buildah run then exits with its status."""
    if runner.poll() is None:
        entry_point_process(runner).send_signal(signal.SIGTERM)
    try:
        return runner.wait(60)
    except subprocess.TimeoutExpired:
        runner.kill()
        runner.wait(10)
        raise AssertionError(f"no exit within 60 s of SIGTERM\n{log.read_text()[-3000:]}") from None


def wait_http(runner: subprocess.Popen, url: str, log: Path, timeout: float) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert runner.poll() is None, f"exited with {runner.returncode}\n{log.read_text()[-4000:]}"
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200:
                return r
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not 200 within {timeout}s\n{log.read_text()[-4000:]}")


def readable_dir(path: Path, owner: int | None = None) -> Path:
    """Mounted into the container, a directory must be readable (or owned) by the image's non-root user."""
    path.mkdir(parents=True, exist_ok=True)
    for p in [path, *path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
        if owner is not None:
            os.chown(p, owner, owner)
    return path


@pytest.mark.parametrize("name", ["operator", "worker"])
def test_image_config_is_the_recipe(images: dict[str, dict], name: str) -> None:
    """The committed OCI config carries what hack/images.sh's recipe (and so the Dockerfile) says."""
    s, image = spec(name), images[name]
    cfg = inspect(image)
    assert cfg["User"] == s["user"] == "65532:65532"
    assert cfg["Entrypoint"] == s["entrypoint"] == ["lorafleet"] and cfg["Cmd"] == s["cmd"]
    assert dict(e.split("=", 1) for e in cfg["Env"]) == s["env"]
    assert sorted(cfg.get("ExposedPorts", {})) == sorted(s["ports"])
    assert sorted(cfg.get("Volumes") or {}) == sorted(s["volumes"])
    labels = cfg["Labels"]
    for key, value in s["labels"].items():
        if value is None:  # the revision: the commit that built it (a cache hit keeps it), "unknown" outside git
            assert re.fullmatch(r"[0-9a-f]{40}|unknown", labels[key]), labels[key]
        else:
            assert labels[key] == value, key
    assert labels["io.lorafleet.image.content"] == image["content"]
    assert image["size_bytes"] > 0


@pytest.mark.parametrize("name", ["operator", "worker"])
def test_image_holds_exactly_the_lock_as_a_non_root_user(containers: dict[str, Container], name: str) -> None:
    """Every distribution in the image's venv is a pin of docker/NAME-requirements.txt (and the wheel); the entry
    point's user is the numeric non-root UID with a passwd entry, and the installed code is not writable to it."""
    lock = (REPO / "docker" / f"{name}-requirements.txt").read_text()
    pins = {canonicalize_name(n): v for n, v in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", lock, re.M)}
    probe = (
        "import importlib.metadata as m, json, os, pwd, shutil, sys; print(json.dumps({"
        "'dists': {d.metadata['Name']: d.version for d in m.distributions()}, 'uid': os.getuid(), "
        "'gid': os.getgid(), 'user': pwd.getpwuid(os.getuid()).pw_name, 'prefix': sys.prefix, "
        "'writable': os.access(sys.prefix + '/lib', os.W_OK), 'pip': shutil.which('pip'), "
        "'entry': shutil.which('lorafleet')}))"
    )
    got = json.loads(containers[name].python(probe))
    dists = {canonicalize_name(k): v for k, v in got["dists"].items()}
    version = spec(name)["labels"]["org.opencontainers.image.version"]
    assert dists == {**pins, "lorafleet": version}
    assert (got["uid"], got["gid"], got["user"]) == (65532, 65532, "lorafleet")
    assert got["prefix"] == "/opt/lorafleet" and got["entry"] == "/opt/lorafleet/bin/lorafleet"
    assert got["writable"] is False and got["pip"] is None


@pytest.mark.cluster
def test_operator_image_serves_healthz(
    containers: dict[str, Container], crds_installed: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    """`lorafleet operator` from the image logs in to the real API server and its kopf liveness answers /healthz."""
    kube = readable_dir(tmp_path / "kube")
    shutil.copy(crds_installed.kubeconfig, kube / "config")
    readable_dir(kube)
    health, metrics, log = free_port(), free_port(), tmp_path / "operator.log"
    args = ["operator", "--standalone", "--namespace", namespace, "--kubeconfig", "/kube/config"]
    args += ["--liveness-host", "127.0.0.1", "--liveness-port", str(health), "--metrics-port", str(metrics)]
    # `--kubeconfig` alone, no $KUBECONFIG: kopf's watches must log in with the operator's own credentials.
    runner = containers["operator"].start(args, log, {kube: "/kube"}, HOME="/tmp")
    try:
        wait_http(runner, f"http://127.0.0.1:{health}/healthz", log, timeout=120)
        text = wait_http(runner, f"http://127.0.0.1:{metrics}/metrics", log, timeout=30).text
        assert "lorafleet_" in text
    finally:
        rc = stop(runner, log)
    assert rc == 0, log.read_text()[-3000:]


def test_worker_image_serves_a_completion(containers: dict[str, Container], tmp_path: Path) -> None:
    """`lorafleet worker` from the image (PyPI's CUDA torch, on a CPU) loads a tiny model the test writes into a
    mounted directory, turns /ready and completes a prompt; SIGTERM stops it cleanly."""
    from lorafleet.worker.testing import build_tiny_llama

    model = readable_dir(build_tiny_llama(tmp_path / "models" / "tiny", seed=0).parent)
    cache = readable_dir(tmp_path / "cache", owner=65532)
    port, log = free_port(), tmp_path / "worker.log"
    args = ["worker", "--model", "/models/tiny", "--served-model-name", "tiny", "--host", "127.0.0.1"]
    args += ["--port", str(port), "--num-kv-blocks", "64", "--max-num-seqs", "4", "--max-loras", "1"]
    runner = containers["worker"].start(
        args, log, {model: "/models", cache: "/cache"}, HOME="/tmp", OMP_NUM_THREADS="1"
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(runner, f"{url}/ready", log, timeout=300)
        with httpx.Client(base_url=url, timeout=60) as client:
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]
            body = {"model": "tiny", "prompt": "the fleet of models", "max_tokens": 4, "temperature": 0}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            done = r.json()
            assert done["usage"]["completion_tokens"] >= 1 and isinstance(done["choices"][0]["text"], str)
            assert done["usage"]["completion_tokens"] == 4 or done["choices"][0]["finish_reason"] == "stop"
    finally:
        rc = stop(runner, log)
    assert rc == 0, log.read_text()[-3000:]


def test_a_failed_build_leaves_no_image_and_no_container(images: dict[str, dict], tmp_path: Path) -> None:
    """A build whose install fails (here: a lock line uv cannot parse) exits non-zero, naming the failure, and leaves the
    store as it found it: the same images under the same tags, no working container, no commit blob."""
    buildah = images["operator"]["buildah"]
    store = Path(buildah[buildah.index("--root") + 1]).parent

    def state() -> tuple[str, list[str]]:
        listing = [*buildah, "images", "--noheading", "--no-trunc", "--format", "{{.ID}} {{.Name}}:{{.Tag}}"]
        tags = subprocess.run(listing, capture_output=True, text=True, check=True, cwd="/").stdout
        return "\n".join(sorted(tags.splitlines())), containers_in(buildah)

    copy = tmp_path / "repo"
    for part in ["hack", "docker", "lorafleet", "operator", "worker", "pyproject.toml", "setup.py", "README.md"]:
        (shutil.copytree if (REPO / part).is_dir() else shutil.copy)(REPO / part, copy / part)
    with open(copy / "docker" / "operator-requirements.txt", "a") as f:
        f.write("this is not a requirement ==\n")
    before = state()
    env = {"LORAFLEET_PYTHON": sys.executable, **os.environ, "LORAFLEET_IMAGES_DIR": str(store)}
    out = subprocess.run(
        ["bash", str(copy / "hack" / "images.sh"), "build", "operator"],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
    )
    assert out.returncode != 0 and out.stdout == ""
    assert "this is not a requirement" in out.stderr, out.stderr[-3000:]
    assert "operator: installing" in out.stderr  # it failed inside the working container, after the root filesystem
    assert state() == before
    assert not (store / "tmp").exists() and not list((store / "rootfs").glob("*.tmp"))
