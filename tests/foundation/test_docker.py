"""The Dockerfiles (no Docker engine runs here, so they are read, not built) against hack/images.sh's recipe, which
CI builds and starts (test_images.py): same base, packages, user, entry point, environment, labels and pinned
requirements. Plus the wheel both install and the pins themselves."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
NAMES = ["operator", "worker"]
ML_STACK = {"torch", "transformers", "peft", "accelerate", "triton"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split()[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines() if line.strip()]


def stages(path: Path) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for op, arg in instructions(path):
        if op == "FROM":
            out.append([])
        out[-1].append((op, arg))
    return out


def spec(name: str) -> dict:
    out = subprocess.run(["bash", str(REPO / "hack" / "images.sh"), "spec", name], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def one(steps: list[tuple[str, str]], op: str) -> str:
    (arg,) = [a for o, a in steps if o == op]
    return arg


def key_values(arg: str) -> dict[str, str]:
    """ENV/LABEL arguments (`K=V K2="V 2"`) as a dict."""
    return dict(token.split("=", 1) for token in shlex.split(arg))


def apt_packages(run: str) -> list[str]:
    m = re.search(r"apt-get install -y --no-install-recommends ([^&]+)", run)
    assert m, run
    return m.group(1).split()


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def lock_pins(name: str) -> dict[str, str]:
    text = (DOCKER / f"{name}-requirements.txt").read_text()
    return {canonicalize_name(n): v for n, v in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, re.M)}


@pytest.mark.parametrize("name", NAMES)
def test_dockerfile_structure(name: str) -> None:
    steps = instructions(DOCKER / f"{name}.Dockerfile")
    for op, arg in steps:
        if op == "COPY" and "--from" not in arg:
            *sources, _ = arg.split()
            assert all((REPO / s).exists() for s in sources), arg
    assert [arg for op, arg in steps if op == "USER"] == ["65532:65532"]
    assert [arg for op, arg in steps if op == "ENTRYPOINT"] == ['["lorafleet"]']
    assert sum(op == "FROM" for op, _ in steps) == 2  # build stage + runtime


@pytest.mark.parametrize("name", NAMES)
def test_dockerfile_and_buildah_recipe_agree(name: str) -> None:
    """What docker builds from docker/NAME.Dockerfile is what hack/images.sh commits with buildah."""
    s = spec(name)
    build, final = stages(DOCKER / f"{name}.Dockerfile")
    # base: Debian's slim image of the same suite (mmdebstrap minbase with the same dpkg excludes) in both stages
    assert one(build, "FROM").split()[0] == one(final, "FROM") == s["base_image"] == f"debian:{s['suite']}-slim"
    runs = [a for o, a in final if o == "RUN"]
    assert apt_packages(runs[0]) == s["packages"]
    assert any(s["add_user"] in run for run in runs)
    for volume in s["volumes"]:
        assert any(f"chown {s['user']}" in run and volume in run for run in runs), volume
    assert one(final, "USER") == s["user"]
    assert json.loads(one(final, "ENTRYPOINT")) == s["entrypoint"] and s["entrypoint"] == ["lorafleet"]
    assert json.loads(one(final, "CMD")) == s["cmd"]
    assert key_values(one(final, "ENV")) == s["env"]
    assert one(final, "EXPOSE").split() == s["ports"]
    assert ("VOLUME" in dict(final)) == bool(s["volumes"])
    if s["volumes"]:
        assert json.loads(one(final, "VOLUME")) == s["volumes"]
    # labels: same keys and values; version and revision come from build args whose default is pyproject's version
    labels = key_values(one(final, "LABEL"))
    args = dict(a.split("=", 1) for o, a in final if o == "ARG")
    assert labels.keys() == s["labels"].keys()
    assert labels["org.opencontainers.image.version"] == "${VERSION}" and args["VERSION"] == pyproject()["version"]
    assert labels["org.opencontainers.image.revision"] == "${REVISION}"
    for key, value in s["labels"].items():
        if value is not None and key != "org.opencontainers.image.version":
            assert labels[key] == value, key
    assert s["labels"]["org.opencontainers.image.version"] == pyproject()["version"]
    # the same pinned requirements, installed the same way, into the same venv
    assert f"COPY {s['requirements']} /tmp/requirements.txt" in [f"{o} {a}" for o, a in build]
    install = one([(o, a) for o, a in build if o == "RUN" and "--require-hashes" in a], "RUN")
    assert f"python3 -m venv --without-pip {s['venv']}" in install
    assert "install --no-deps --require-hashes -r /tmp/requirements.txt" in install
    assert f"COPY --from=build {s['venv']} {s['venv']}" in [f"{o} {a}" for o, a in final]
    assert s["env"]["PATH"].startswith(f"{s['venv']}/bin:")


@pytest.mark.parametrize("name", NAMES)
def test_locked_versions_satisfy_pyproject(name: str) -> None:
    """Each image's lock (regenerate: `bash hack/images.sh lock`) pins every package pyproject names for it, within
    pyproject's pins; the operator's lock carries no ML stack, the worker's adds hack/s3-requirements.txt as is."""
    pins = lock_pins(name)
    s = spec(name)
    wanted = [Requirement(d) for d in pyproject()["dependencies"]]
    if s["pyproject_dependencies"] != ["*"]:
        wanted = [r for r in wanted if canonicalize_name(r.name) in s["pyproject_dependencies"]]
        assert len(wanted) == len(s["pyproject_dependencies"]), "a package of the recipe is not in pyproject"
    if name == "operator":
        assert not ML_STACK & pins.keys()
    for req in wanted:
        key = canonicalize_name(req.name)
        assert key in pins, f"{req} is not in docker/{name}-requirements.txt: run bash hack/images.sh lock"
        assert req.specifier.contains(pins[key], prereleases=True), f"{req} vs locked {pins[key]}"
    if name == "worker":
        s3 = (REPO / "hack" / "s3-requirements.txt").read_text()
        for n, v in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", s3, re.M):
            assert pins[canonicalize_name(n)] == v, n
    blocks = re.split(r"\n(?=[A-Za-z0-9])", (DOCKER / f"{name}-requirements.txt").read_text())
    pinned = [b for b in blocks if "==" in b.split("\n", 1)[0]]
    assert len(pinned) == len(pins) and all("--hash=sha256:" in b for b in pinned)


def test_operator_never_imports_the_ml_stack() -> None:
    """The operator image leaves out torch & co; only right if the operator really never imports them."""
    probe = (
        "import sys, lorafleet.operator.main, lorafleet.operator.handlers; "
        f"print(sorted(m for m in {sorted(ML_STACK)!r} if m in sys.modules))"
    )
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )


def test_image_user_matches_manifests() -> None:
    deploy = yaml.safe_load((REPO / "manifests" / "deployment.yaml").read_text())
    sc = deploy["spec"]["template"]["spec"]["securityContext"]
    assert f"{sc['runAsUser']}:{sc['runAsGroup']}" == spec("operator")["user"] == spec("worker")["user"]


@pytest.mark.slow
def test_wheel_maps_folders_under_lorafleet(tmp_path: Path) -> None:
    """What the Dockerfiles install: operator/ and worker/ land under lorafleet/, never as top-level packages."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("lorafleet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lorafleet/operator/main.py" in names and "lorafleet/worker/main.py" in names
    assert "lorafleet/controlplane/cluster.py" in names and "lorafleet/crds.py" in names
    assert not any(n.startswith(("operator/", "worker/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lorafleet = lorafleet.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def default_image(name: str) -> str:
    """The reference hack/images.sh tags besides the content tag: its default registry, the name, pyproject's version."""
    m = re.search(
        r'^REGISTRY="\$\{LORAFLEET_IMAGE_REGISTRY:-([^}]+)\}"', (REPO / "hack" / "images.sh").read_text(), re.M
    )
    assert m, "hack/images.sh sets no default REGISTRY"
    return f"{m[1]}/{name}:{pyproject()['version']}"


def test_deployments_name_the_built_images() -> None:
    """What the manifests, the chart and the operator deploy by default is what hack/images.sh builds and tags."""
    from lorafleet.operator import resources

    deploy = yaml.safe_load((REPO / "manifests" / "deployment.yaml").read_text())
    (container,) = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "operator"]
    assert container["image"] == default_image("operator")
    values = yaml.safe_load((REPO / "charts" / "lorafleet" / "values.yaml").read_text())["image"]
    chart = yaml.safe_load((REPO / "charts" / "lorafleet" / "Chart.yaml").read_text())
    assert f"{values['repository']}:{values['tag'] or chart['appVersion']}" == default_image("operator")
    assert resources.WORKER_IMAGE == default_image("worker")
    sample = yaml.safe_load((REPO / "manifests" / "samples" / "basemodel.yaml").read_text())
    assert sample["spec"]["worker"]["image"] == default_image("worker")


def test_worker_pods_fit_the_worker_image() -> None:
    """The operator's worker pods run the image's user, and their caches and claims land in the image's volumes
    (the root filesystem is read-only in those pods)."""
    from lorafleet.operator import podspec

    s = spec("worker")
    assert f"{podspec.WORKER_UID}:{podspec.WORKER_UID}" == s["user"]
    assert podspec.CACHE_DIR in s["volumes"]
    assert any(podspec.CLAIM_ROOT.startswith(v + "/") for v in s["volumes"])
    env = {e["name"]: e["value"] for e in podspec.cache_env()}
    for key in ("HF_HOME", "TRITON_CACHE_DIR"):
        assert env[key] == s["env"][key]
