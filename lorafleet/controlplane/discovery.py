"""Installing CRDs so that `kubectl get <category>` works at once, not only `kubectl get <plural>`.

Why this exists: `lorafleet up` once answered `kubectl get lorafleet` with "the server doesn't have a resource type
lorafleet" although the CRDs were Established and carry `categories: [lorafleet]`. kubectl expands a category from
its *discovery cache* (~/.kube/cache/discovery/<host_port>, kept for hours) and, unlike a plain resource name, does
not re-read discovery when the category is unknown: it falls through to "resource type lorafleet", which does not
exist. Our control planes use a fresh random loopback port each time, so a cache written for an earlier cluster (or
for this one before the CRDs were served) is easily stale. Established also does not mean that the API server's
discovery already lists the new resources: the discovery controller catches up asynchronously.

So after `Established` we (1) wait until the group's discovery document lists every resource with the category,
then (2) run `kubectl api-resources` (never cached: it invalidates and rewrites the discovery cache) and
(3) require `kubectl get <category> -A` to succeed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from lorafleet.controlplane.client import ApiError


def crd_documents(crd_dir: Path) -> list[dict[str, Any]]:
    """The CustomResourceDefinitions in `crd_dir` (kustomization and other files are ignored)."""
    out = []
    for path in sorted(crd_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                out.append(doc)
    return out


def served_resources(cp: Any, group: str, version: str) -> dict[str, list[str]]:
    """plural -> categories, as the API server's discovery serves them right now ({} while the group is absent)."""
    try:
        doc = cp.request("GET", f"/apis/{group}/{version}")
    except ApiError as exc:
        if exc.status == 404:
            return {}
        raise
    return {r["name"]: list(r.get("categories") or []) for r in doc.get("resources", []) if "/" not in r["name"]}


def _serves(served: dict[str, list[str]], plural: str, categories: list[str]) -> bool:
    return plural in served and set(categories) <= set(served[plural])


def install_crds(cp: Any, crd_dir: Path, *, cache_dir: Path | None = None, timeout: float = 60.0) -> None:
    """Applies `crd_dir` server-side and returns once every CRD is Established, discovery serves each resource with
    its categories, and kubectl (with `cache_dir`, or the user's default cache) resolves every category."""
    cache = [f"--cache-dir={cache_dir}"] if cache_dir is not None else []
    docs = crd_documents(crd_dir)
    cp.kubectl("apply", "--server-side", "--force-conflicts", "-k", str(crd_dir))
    names = [f"crd/{d['metadata']['name']}" for d in docs]
    cp.kubectl("wait", "--for=condition=Established", f"--timeout={int(timeout)}s", *names)
    deadline = time.monotonic() + timeout
    categories: set[str] = set()
    for d in docs:
        group, names_ = d["spec"]["group"], d["spec"]["names"]
        want = list(names_.get("categories") or [])
        categories.update(want)
        for v in (v["name"] for v in d["spec"]["versions"] if v.get("served", True)):
            while not _serves(served_resources(cp, group, v), names_["plural"], want):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"discovery does not serve {names_['plural']}.{group}/{v} with {want}")
                time.sleep(0.2)
    cp.kubectl("api-resources", "-o", "name", *cache)  # uncached: refreshes kubectl's discovery cache
    for category in sorted(categories):
        while cp.kubectl("get", category, "-A", "-o", "name", *cache, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"kubectl get {category} still fails after the CRDs are served")
            cp.kubectl("api-resources", "-o", "name", *cache)
            time.sleep(0.5)
