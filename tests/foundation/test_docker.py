"""The Dockerfiles (no Docker engine runs here, so they are checked statically) and the wheel they install."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [
        (line.split()[0].upper(), line.split(None, 1)[1])
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[=<>!~ ]", d, maxsplit=1)[0].lower(): d for d in deps}


@pytest.mark.parametrize("name", ["operator", "worker"])
def test_dockerfile_structure(name: str) -> None:
    steps = instructions(DOCKER / f"{name}.Dockerfile")
    for op, arg in steps:
        if op == "COPY" and "--from" not in arg:
            *sources, _ = arg.split()
            assert all((REPO / s).exists() for s in sources), arg
    users = [arg for op, arg in steps if op == "USER"]
    assert users == ["65532:65532"]
    assert [arg for op, arg in steps if op == "ENTRYPOINT"] == ['["lorafleet"]']
    assert sum(op == "FROM" for op, _ in steps) == 2  # build stage + slim runtime


def test_operator_image_pins_match_pyproject_and_skip_torch() -> None:
    text = (DOCKER / "operator.Dockerfile").read_text()
    pinned = re.findall(r'"([A-Za-z0-9_.\-]+(?:==|>=)[^"]+)"', text)
    pins = pyproject_pins()
    wanted = {"kopf", "kubernetes", "ortools", "prometheus-client", "pydantic", "httpx", "pyyaml"}
    assert {p.split("=")[0].split(">")[0].lower() for p in pinned} >= wanted
    for spec in pinned:
        package = re.split(r"[=<>]", spec, maxsplit=1)[0].lower()
        if package in pins:
            assert spec == pins[package], f"{spec} != pyproject {pins[package]}"
    assert "torch" not in text.split("FROM python:3.12-slim\n")[-1]
    # ...which is only right if the operator really never imports the ML stack:
    probe = "import sys, lorafleet.operator.main, lorafleet.operator.handlers; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )


def test_image_user_matches_manifests() -> None:
    deploy = yaml.safe_load((REPO / "manifests" / "deployment.yaml").read_text())
    sc = deploy["spec"]["template"]["spec"]["securityContext"]
    assert f"{sc['runAsUser']}:{sc['runAsGroup']}" == "65532:65532"


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
