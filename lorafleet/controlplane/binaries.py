"""Finds the control-plane binaries built by hack/testbins/build.sh, building them on first use.

Versions come from hack/testbins/versions.env (one place to bump them); the fallback constants below only matter
when the package is used without its source tree.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "testbins" / "build.sh"
VERSIONS_FILE = REPO_ROOT / "hack" / "testbins" / "versions.env"
DEFAULT_VERSIONS = {
    "K8S_VERSION": "v1.36.3",
    "ETCD_VERSION": "v3.6.16",
    "KWOK_VERSION": "v0.8.0",
    "HELM_VERSION": "v3.21.4",
    "VERSITYGW_VERSION": "v1.8.0",
    "HELM4_VERSION": "v4.3.2",
}


def cache_dir() -> Path:
    """Root of every cached artefact (`LORAFLEET_CACHE`, default ~/.cache/lorafleet)."""
    return Path(os.environ.get("LORAFLEET_CACHE", Path.home() / ".cache" / "lorafleet"))


def versions() -> dict[str, str]:
    """The pinned component versions, read from versions.env when the source tree is present."""
    found = dict(DEFAULT_VERSIONS)
    if VERSIONS_FILE.exists():
        for line in VERSIONS_FILE.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.strip().startswith("#"):
                found[key.strip()] = value.strip()
    return found


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of every executable the control plane runs."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    kwok: Path
    helm: Path

    def missing(self) -> list[Path]:
        return [p for p in vars(self).values() if not os.access(p, os.X_OK)]


def _expected() -> Binaries:
    v = versions()
    root = cache_dir() / "bin"
    k8s = root / f"k8s-{v['K8S_VERSION']}"
    return Binaries(
        etcd=root / f"etcd-{v['ETCD_VERSION']}" / "etcd",
        kube_apiserver=k8s / "kube-apiserver",
        kube_controller_manager=k8s / "kube-controller-manager",
        kube_scheduler=k8s / "kube-scheduler",
        kubectl=k8s / "kubectl",
        kwok=root / f"kwok-{v['KWOK_VERSION']}" / "kwok",
        helm=root / f"helm-{v['HELM_VERSION']}" / "helm",
    )


def binaries(build: bool = True) -> Binaries:
    """Returns the binaries; if some are missing and `build`, runs build.sh (minutes cold) under a file lock so that
    concurrent callers wait for one build instead of starting several."""
    found = _expected()
    if not found.missing():
        return found
    if not build or not BUILD_SCRIPT.exists():
        raise FileNotFoundError(
            f"control-plane binaries missing: {[str(p) for p in found.missing()]}; run {BUILD_SCRIPT}"
        )
    lock_path = cache_dir() / "build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        print(f"[controlplane] waiting for the build lock {lock_path}", file=sys.stderr, flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if found.missing():
            print(f"[controlplane] building control-plane binaries with {BUILD_SCRIPT}", file=sys.stderr, flush=True)
            env = {**os.environ, "LORAFLEET_BUILD_LOCK_HELD": "1"}
            subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.DEVNULL, env=env)
    if found.missing():
        raise FileNotFoundError(f"build finished but binaries are still missing: {found.missing()}")
    return found


def _on_demand(path: Path, target: str, what: str, build: bool) -> Path:
    """`path`, built by `build.sh TARGET` under the shared build lock if it is missing (and `build` allows)."""
    if os.access(path, os.X_OK):
        return path
    if not build or not BUILD_SCRIPT.exists():
        raise FileNotFoundError(f"{what} missing: {path}; run {BUILD_SCRIPT} {target}")
    lock_path = cache_dir() / "build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.access(path, os.X_OK):
            env = {**os.environ, "LORAFLEET_BUILD_LOCK_HELD": "1"}
            subprocess.run(["bash", str(BUILD_SCRIPT), target], check=True, stdout=subprocess.DEVNULL, env=env)
    return path


def versitygw(build: bool = True) -> Path:
    """The S3-compatible server the store tests run (versitygw, Apache-2.0, an S3 gateway over a directory); built
    by build.sh like the control plane, under the same lock."""
    path = cache_dir() / "bin" / f"versitygw-{versions()['VERSITYGW_VERSION']}" / "versitygw"
    return _on_demand(path, "versitygw", "versitygw", build)


def helm4(build: bool = True) -> Path:
    """Helm 4, built on demand (`build.sh helm4`) and kept out of `Binaries`: only the chart tests need it, so a
    missing Helm 4 never makes every control-plane user wait for a build."""
    path = cache_dir() / "bin" / f"helm-{versions()['HELM4_VERSION']}" / "helm"
    return _on_demand(path, "helm4", "helm 4", build)
