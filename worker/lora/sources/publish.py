"""Continual-learning versions published to the adapter's store, so every replica loads the same bytes.

The job of an adapter loaded from `s3://BUCKET/PREFIX`, or from a claim mounted writable (`pvc://CLAIM/PATH`),
writes each version into that store (`layout.py`: `<base>/versions/vN/`, files first, manifest last) and reports the
version's store URI as its `path`; the operator rolls that URI out to every replica (`load_lora_adapter`, in place),
and each replica, one that never trained included, reads it through its own resolver and checks it against the
manifest. Published versions are immutable: a version number that has a manifest is never written again.

Why a background thread per adapter: a job publishes from the engine thread, between serving iterations, and an
upload of tens of megabytes must not stall the requests running there. So the trainer serves the new version at
once from its own directory, the upload runs beside it, and the version gets its store URI in the job status only
once its manifest is written. Until then, and while a failed upload is retried with backoff, the status reports no
path for it (`api`), so the operator keeps the previous version serving on every other replica.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lorafleet.worker.lora.sources.errors import SourceError
from lorafleet.worker.lora.sources.layout import (
    MANIFEST,
    VERSIONS_DIR,
    build_manifest,
    manifest_bytes,
    split_version,
    version_files,
    version_uri,
)
from lorafleet.worker.lora.sources.progress import SourceMetrics
from lorafleet.worker.lora.sources.s3 import explain, upload_dir
from lorafleet.worker.lora.sources.uri import parse, scheme_of

log = logging.getLogger("lorafleet.worker.sources")
STORE_FILE = ".lorafleet-store.json"  # in a job's versions directory: the store its versions go to
RETRY_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)
_VDIR = re.compile(r"^v([1-9][0-9]{0,8})$")


class VersionConflict(SourceError):
    """The version number exists in the store with other bytes: retrying cannot help, so the upload is given up
    (the status keeps saying why) and later versions go on."""


class VersionStore(Protocol):
    base: str
    scheme: str

    def versions(self) -> dict[int, bool]:
        """Every version number found in the store -> whether it is complete (has its manifest)."""
        ...

    def write(self, local: Path, n: int) -> str:
        """Publishes `local` as version `n`; returns its URI. Idempotent for the same bytes, refuses other ones."""
        ...


class S3VersionStore:
    scheme = "s3"

    def __init__(self, client: Any, base: str) -> None:
        self.client, self.base, self.ref = client, base, parse(base)

    def _prefix(self) -> str:
        return f"{self.ref.path}/{VERSIONS_DIR}/" if self.ref.path else f"{VERSIONS_DIR}/"

    def versions(self) -> dict[int, bool]:
        out: dict[int, bool] = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.ref.where, Prefix=self._prefix())
            for page in pages:
                for obj in page.get("Contents") or []:
                    head, _, name = obj["Key"][len(self._prefix()) :].partition("/")
                    if (m := _VDIR.match(head)) is not None:
                        out[int(m[1])] = out.get(int(m[1]), False) or name == MANIFEST
        except Exception as exc:  # noqa: BLE001 - every botocore failure becomes a SourceError naming the store
            raise explain(self.base, exc) from exc
        return out

    def _manifest(self, uri: str) -> bytes | None:
        from botocore.exceptions import ClientError

        ref = parse(uri)
        try:
            return self.client.get_object(Bucket=ref.where, Key=f"{ref.path}/{MANIFEST}")["Body"].read()
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404"):
                return None
            raise explain(uri, exc) from exc
        except Exception as exc:  # noqa: BLE001
            raise explain(uri, exc) from exc

    def write(self, local: Path, n: int) -> str:
        uri = version_uri(self.base, n)
        body = manifest_bytes(build_manifest(local, n))
        existing = self._manifest(uri)
        if existing is not None:
            if existing == body:
                return uri  # an earlier attempt (or process) completed this very version
            raise VersionConflict(
                uri, "exists in the store with other content; published versions are never overwritten"
            )
        return upload_dir(self.client, Path(local), uri, parse(uri), last=(MANIFEST, body))


class ClaimVersionStore:
    """Versions in a claim mounted writable (ReadWriteMany): written into a temporary directory, manifest last, then
    renamed into place, so a reader on any node sees a whole version or none."""

    scheme = "pvc"

    def __init__(self, root: Path, base: str) -> None:
        self.root, self.base = Path(root), base

    def versions(self) -> dict[int, bool]:
        vdir = self.root / VERSIONS_DIR
        found = (_VDIR.match(p.name) for p in vdir.iterdir()) if vdir.is_dir() else iter(())
        return {int(m[1]): (vdir / m[0] / MANIFEST).is_file() for m in found if m is not None}

    def write(self, local: Path, n: int) -> str:
        uri = version_uri(self.base, n)
        body = manifest_bytes(build_manifest(local, n))
        final = self.root / VERSIONS_DIR / f"v{n}"
        if final.exists():
            if (final / MANIFEST).is_file() and (final / MANIFEST).read_bytes() == body:
                return uri
            raise VersionConflict(
                uri, "exists in the claim with other content; published versions are never overwritten"
            )
        tmp = final.with_name(f".tmp-v{n}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            for p in version_files(local):
                shutil.copyfile(p, tmp / p.name)
            (tmp / MANIFEST).write_bytes(body)
            for p in tmp.iterdir():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SourceError(uri, f"cannot write the version into the claim ({exc})") from exc
        return uri


@dataclass
class _State:
    state: str  # pending | published | failed
    uri: str
    error: str = ""
    attempts: int = 0


class AdapterPublisher:
    """One adapter's versions on their way to its store (see the module docstring), in version order."""

    def __init__(
        self, adapter: str, store: VersionStore, metrics: SourceMetrics | None = None, retry=RETRY_SECONDS
    ) -> None:
        self.adapter, self.store, self.metrics, self.retry = adapter, store, metrics, tuple(retry)
        self._states: dict[int, _State] = {}
        self._seen = 0  # the highest version number found in the store, complete or not
        self._queue: deque[tuple[int, Path]] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def learn(self) -> None:
        """Reads which versions the store already holds (a job moved to another worker numbers on from there)."""
        found = self.store.versions()
        with self._cv:
            self._seen = max([self._seen, *found])
            for n, complete in found.items():
                if complete:
                    self._states[n] = _State("published", version_uri(self.store.base, n))

    def newest(self) -> int:
        with self._cv:
            return max([self._seen, *self._states])

    def published(self, n: int) -> bool:
        with self._cv:
            st = self._states.get(n)
            return st is not None and st.state == "published"

    def submit(self, n: int, local: Path) -> None:
        """Queues version `n` (its directory `local`) for the store; returns at once."""
        with self._cv:
            if n in self._states and self._states[n].state == "published":
                return
            self._states[n] = _State("pending", version_uri(self.store.base, n))
            self._queue.append((n, Path(local)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"publish-{self.adapter}", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def api(self, entry: dict[str, Any]) -> dict[str, Any]:
        """A job status entry of `publishedVersions`: `path` is the store URI once the version is whole there, ""
        before (the operator rolls out only entries with a path); `store` says where and how far."""
        with self._cv:
            st = self._states.get(int(entry.get("version") or 0))
            out = dict(entry)
            out["path"] = st.uri if st is not None and st.state == "published" else ""
            info: dict[str, Any] = {"uri": version_uri(self.store.base, int(entry.get("version") or 0))}
            info["state"] = st.state if st is not None else "unknown"
            if st is not None and st.error:
                info["error"] = st.error
            out["store"] = info
            return out

    def note(self, message: str) -> str:
        """The job's status message, with why a version is not in the store yet (when an upload fails)."""
        with self._cv:
            failed = [(n, s) for n, s in sorted(self._states.items()) if s.state == "failed"]
        if not failed:
            return message
        n, st = failed[0]
        why = f"version v{n} is not in the store yet ({st.error}); retrying, other replicas keep the previous version"
        return f"{message}; {why}" if message else why

    def wait(self, n: int, timeout: float) -> bool:
        """Until version `n` is published (tests, shutdown)."""
        with self._cv:
            return self._cv.wait_for(lambda: self.published(n) or self._closed, timeout) and self.published(n)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def _run(self) -> None:
        attempt = 0
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    return
                n, local = self._queue[0]
            try:
                uri = self.store.write(local, n)
            except VersionConflict as exc:
                log.error("publishing %s v%d: %s", self.adapter, n, exc)
                self._count("failed")
                with self._cv:
                    self._queue.popleft()
                    self._states[n] = _State("failed", version_uri(self.store.base, n), exc.reason, attempt + 1)
                continue
            except Exception as exc:  # noqa: BLE001 - a failed upload is retried; it must never end the thread
                reason = exc.reason if isinstance(exc, SourceError) else f"{type(exc).__name__}: {exc}"
                delay = self.retry[min(attempt, len(self.retry) - 1)]
                attempt += 1
                log.warning("publishing %s v%d to %s failed (retry in %.0f s): %s", self.adapter, n, self.store.base,
                            delay, reason)  # fmt: skip
                self._count("failed")
                with self._cv:
                    self._states[n] = _State("failed", version_uri(self.store.base, n), reason, attempt)
                    self._cv.wait_for(lambda: self._closed, delay)
                continue
            attempt = 0
            log.info("published %s v%d to %s", self.adapter, n, uri)
            self._count("published")
            with self._cv:
                self._queue.popleft()
                self._states[n] = _State("published", uri)
                self._cv.notify_all()

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.publishes.labels(self.store.scheme, result).inc()


class VersionSink:
    """The worker's one way to publish versions: `bind` gives a job its adapter's publisher, or None when the
    adapter's source is no store every replica reads (a local path, a read-only claim, the hub)."""

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver  # a SourceResolver: its S3 client, claim root and metrics
        self._bound: dict[str, AdapterPublisher] = {}
        self._lock = threading.Lock()

    def bind(self, adapter: str, source_uri: str | None, versions_dir: Path) -> AdapterPublisher | None:
        base = store_base(source_uri, Path(versions_dir))
        if base is None:
            return None
        with self._lock:
            known = self._bound.get(adapter)
        if known is not None and known.store.base == base:
            pub = known  # a later job of the same adapter in this process: same uploads, same thread
        else:
            store = self._store(base)
            if store is None:
                return None
            record_store(Path(versions_dir), base)
            pub = AdapterPublisher(adapter, store, self.resolver.metrics)
        try:
            pub.learn()  # what other workers published meanwhile: the job numbers on past it
        except SourceError as exc:
            log.warning("adapter %s: cannot list the versions in its store (numbering from what this worker "
                        "knows): %s", adapter, exc)  # fmt: skip
        for n, d in local_versions(Path(versions_dir)):
            if not pub.published(n):  # a version this worker made before a restart, not (fully) uploaded yet
                pub.submit(n, d)
        with self._lock:
            self._bound[adapter] = pub
        return pub

    def _store(self, base: str) -> VersionStore | None:
        ref = parse(base)
        if ref.scheme == "s3":
            return S3VersionStore(self.resolver._s3_client(), base)
        if ref.scheme == "pvc":
            try:
                root = self.resolver.pvc.locate(ref)
            except SourceError as exc:
                log.warning("versions stay on this worker: %s", exc)
                return None
            if not os.access(root, os.W_OK):
                log.warning("versions stay on this worker: claim %s is mounted read-only (mount it writable, "
                            "ReadWriteMany, to publish versions there)", ref.where)  # fmt: skip
                return None
            return ClaimVersionStore(root, base)
        return None

    def close(self) -> None:
        with self._lock:
            for pub in self._bound.values():
                pub.close()


def store_base(source_uri: str | None, versions_dir: Path) -> str | None:
    """The store an adapter's versions go to: its source's (a version URI's base) for s3:// and pvc:// sources;
    for a source inside the job's own versions directory (a worker that resumed from its newest local version)
    the store recorded there when the job first bound it."""
    if source_uri and scheme_of(source_uri) in ("s3", "pvc"):
        return split_version(source_uri)[0]
    if source_uri and scheme_of(source_uri) != "":
        return None  # the hub (or any other remote): no store every replica can write and read
    if source_uri:
        try:
            inside = Path(source_uri).resolve().is_relative_to(versions_dir.resolve())
        except OSError:
            inside = False
        if not inside:
            return None
    try:
        return str(json.loads((versions_dir / STORE_FILE).read_text())["base"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_store(versions_dir: Path, base: str) -> None:
    versions_dir.mkdir(parents=True, exist_ok=True)
    tmp = versions_dir / f"{STORE_FILE}.tmp"
    tmp.write_text(json.dumps({"base": base}))
    os.replace(tmp, versions_dir / STORE_FILE)


def local_versions(versions_dir: Path) -> list[tuple[int, Path]]:
    """(number, directory) of every whole version a job saved under `versions_dir`, oldest first."""
    found = ((_VDIR.match(p.name), p) for p in versions_dir.iterdir()) if versions_dir.is_dir() else iter(())
    return sorted((int(m[1]), p) for m, p in found if m is not None and (p / "adapter_model.safetensors").is_file())
