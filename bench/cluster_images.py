"""image_build_seconds: hack/images.sh cold (an empty image store: mmdebstrap, install, commit), cached (the same
inputs again) and after a code change (a copy of the checkout with one source file changed: a new wheel, so both
images are installed and committed again from the cached root filesystems), with the sizes of the operator and worker
images and the disk the cold build needs at its peak. What CI pays in its `images` stage: cold on a clean machine,
code change on a warm one at a new commit, cached on a rerun of the same commit.

Cold here means what CI's clean machine has after its venv stage: uv's cache holds the wheels (hack/venv.sh put them
there), the image store is empty. Run: `python bench/cluster_images.py` (about 15 minutes on 2 cores); writes
bench/results/cluster_images.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import RESULTS, ROOT, commit, provenance, write_result

# What hack/images.sh reads from a checkout (its wheel's sources, the recipe, the locks).
INPUTS = ["hack", "docker", "lorafleet", "operator", "worker", "pyproject.toml", "setup.py", "README.md"]


def build(images_dir: Path, checkout: Path) -> tuple[float, dict[str, dict]]:
    env = {**os.environ, "LORAFLEET_IMAGES_DIR": str(images_dir), "LORAFLEET_PYTHON": sys.executable}
    t0 = time.monotonic()
    out = subprocess.run(
        ["bash", str(checkout / "hack" / "images.sh"), "build"], capture_output=True, text=True, env=env, cwd="/"
    )
    seconds = time.monotonic() - t0
    if out.returncode != 0:
        raise SystemExit(f"hack/images.sh failed:\n{out.stderr[-4000:]}")
    return seconds, {d["name"]: d for d in map(json.loads, out.stdout.splitlines())}


def disk_bytes(path: Path) -> int:
    return int(subprocess.check_output(["du", "-sb", str(path)], text=True).split()[0])


class DiskPeak:
    """The most the filesystem of `path` filled beyond its level at start, sampled twice a second (every writer on
    that filesystem counts, so on a shared machine it is an upper bound for the build's own peak)."""

    def __init__(self, path: Path) -> None:
        self.path, self.start, self.peak = path, shutil.disk_usage(path).used, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, shutil.disk_usage(self.path).used - self.start)

    def __enter__(self) -> DiskPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def copy_inputs(into: Path, checkout: Path = ROOT) -> Path:
    for part in INPUTS:
        (shutil.copytree if (checkout / part).is_dir() else shutil.copy)(checkout / part, into / part)
    return into


def changed_copy(snapshot: Path, into: Path) -> Path:
    """The snapshot with one source file changed (what a new commit does to the wheel)."""
    copy_inputs(into, snapshot)
    with open(into / "lorafleet" / "__init__.py", "a") as f:
        f.write("# changed by bench/cluster_images.py\n")
    return into


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=RESULTS / "cluster_images.json")
    p.add_argument("--keep", action="store_true", help="keep the benchmark's image store")
    args = p.parse_args(argv)
    # On the filesystem of uv's cache (~/.cache), as the default store is, so wheels are hard-linked as in CI.
    base = Path(os.environ.get("LORAFLEET_CACHE", Path.home() / ".cache" / "lorafleet"))
    base.mkdir(parents=True, exist_ok=True)
    store = Path(tempfile.mkdtemp(prefix="bench-images-", dir=base))
    # Every build reads a snapshot of the checkout taken now, so edits (or a rebase) while it runs change nothing.
    src = Path(tempfile.mkdtemp(prefix="bench-images-src-"))
    snapshot = copy_inputs(src / "snapshot")
    started = commit()

    def record(metrics: dict, builds: dict[str, dict]) -> None:
        """Written after the cached build and again after the code change (a run cut short keeps the first)."""
        result = {
            "benchmark": "cluster_images",
            **provenance("cluster_images.py", argv, "cpu"),
            "commit": started,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metrics": metrics,
            "notes": {
                "cold": "empty image store; uv's cache warm from the venv build (as in CI); Debian packages downloaded",
                "code_change": "the store of the cold build, the checkout's snapshot with lorafleet/__init__.py changed",
                "disk_peak": "filesystem growth during the cold build (other writers on the machine included)",
                "load": f"1-minute load average when written: {os.getloadavg()[0]:.1f}",
                "sizes": "uncompressed layer bytes as stored (one layer per image); a registry push compresses",
                "images": {name: d["ref"] for name, d in builds.items()},
                "machine": f"{os.cpu_count()} cores",
            },
        }
        write_result(args.out, result)
        print(json.dumps(metrics, indent=1), flush=True)

    try:
        with DiskPeak(store) as disk:
            cold_s, cold = build(store, snapshot)
        cached_s, cached = build(store, snapshot)
        missed = [n for n, d in cached.items() if not d["cached"]] + [n for n, d in cold.items() if d["cached"]]
        assert not missed, f"cold built from cache or cached rebuilt: {missed}"
        metrics = {
            "image_build_seconds_cold": round(cold_s, 1),
            "image_build_seconds_cached": round(cached_s, 1),
            "cached_over_cold": round(cached_s / cold_s, 4),
        }
        for name, d in cold.items():
            metrics[f"{name}_image_bytes"] = d["size_bytes"]
            metrics[f"{name}_build_seconds_cold"] = d["seconds"]
        metrics["store_bytes_after_build"] = disk_bytes(store)
        metrics["disk_peak_bytes_cold"] = disk.peak
        record(metrics, cold)
        changed_s, changed = build(store, changed_copy(snapshot, src / "changed"))
        assert not [n for n, d in changed.items() if d["cached"]]
        metrics["image_build_seconds_code_change"] = round(changed_s, 1)
        metrics["code_change_over_cold"] = round(changed_s / cold_s, 4)
        for name, d in changed.items():
            metrics[f"{name}_build_seconds_code_change"] = d["seconds"]
        record(metrics, cold)
    finally:
        if not args.keep:  # vfs layers are plain directories: no mounts to undo
            shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)


if __name__ == "__main__":
    main()
