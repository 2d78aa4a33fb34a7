"""`s3://bucket/prefix` sources through boto3: the standard credential chain and any S3-compatible endpoint.

Credentials come from wherever boto3 finds them (environment, shared config/credentials files, web identity for
IRSA, instance metadata); the endpoint from `endpoint_url`, else `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, else AWS.
A source is every object directly under the prefix (an adapter directory; a model's may nest). Its version is a
digest of the objects' names, sizes and ETags, so a re-uploaded file is a new cache entry. Downloads resume with a
Range request on the partial file (`IfMatch` the ETag, so a changed object restarts instead of mixing), and every
file is checked against its size, its MD5 ETag (single-part uploads) and an `x-amz-meta-sha256` where present (the
publisher writes one). A published version (`layout.py`) is read through its manifest: exactly the files it lists,
checked against its sizes and SHA-256s; a version URI without a manifest is incomplete and refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from lorafleet.worker.lora.sources.cache import CacheKey, SourceCache
from lorafleet.worker.lora.sources.errors import SourceError
from lorafleet.worker.lora.sources.layout import MANIFEST, incomplete, is_version, parse_manifest
from lorafleet.worker.lora.sources.progress import Progress, SourceMetrics
from lorafleet.worker.lora.sources.uri import SourceRef
from lorafleet.worker.lora.sources.verify import check_tree, md5_file, select_files, sha256_file

_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "403"}
CHUNK = 1 << 20
log = logging.getLogger(__name__)


def s3_client(endpoint_url: str | None = None, addressing_style: str | None = None) -> Any:
    """A boto3 S3 client; path-style addressing by default when a custom endpoint is set (most S3-compatible
    servers and every IP-addressed one need it)."""
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    style = addressing_style or ("path" if endpoint else "auto")
    cfg = Config(
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": style},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)


def explain(uri: str, exc: BaseException) -> SourceError:
    """A botocore failure as a SourceError that says what a user can fix."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            return SourceError(uri, "bucket does not exist")
        if code in ("NoSuchKey", "404"):
            return SourceError(uri, "object does not exist")
        if code in _DENIED:
            return SourceError(uri, f"access denied ({code}): check the worker's S3 credentials")
        return SourceError(uri, f"S3 error {code}: {exc}")
    if isinstance(exc, NoCredentialsError):
        return SourceError(uri, "no S3 credentials found (environment, config files, web identity or instance role)")
    if isinstance(exc, EndpointConnectionError):
        return SourceError(uri, f"S3 endpoint unreachable ({exc})")
    return SourceError(uri, f"S3 request failed ({type(exc).__name__}: {exc})")


class S3Source:
    scheme = "s3"

    def __init__(self, cache: SourceCache, metrics: SourceMetrics, client: Any | None = None) -> None:
        self.cache = cache
        self.metrics = metrics
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client()
        return self._client

    def _listing(self, ref: SourceRef) -> dict[str, dict]:
        prefix = f"{ref.path}/" if ref.path else ""
        objects: dict[str, dict] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=ref.where, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents") or []:
                rel = obj["Key"][len(prefix) :]
                if rel and not rel.endswith("/"):
                    objects[rel] = obj
        return objects

    def fetch(self, ref: SourceRef, kind: str) -> tuple[Path, bool]:
        """(verified directory, whether it was downloaded now rather than found in the cache)."""
        try:
            objects = self._listing(ref)
        except Exception as exc:  # noqa: BLE001 - every botocore failure becomes a SourceError naming the source
            raise explain(ref.uri, exc) from exc
        manifest = self._manifest(ref, objects)  # a version without one is incomplete, however many objects it has
        if not objects:
            raise SourceError(ref.uri, "no objects under this prefix")
        names = select_files(ref.uri, manifest if manifest is not None else objects, kind)
        digest = hashlib.sha256(str(objects.get(MANIFEST, {}).get("ETag", "")).encode())
        for n in names:
            digest.update(f"{n}\0{objects[n]['Size']}\0{objects[n].get('ETag', '')}\n".encode())
        key = CacheKey("s3", ref.uri, digest.hexdigest()[:20])
        hit = self.cache.lookup(key)
        if hit is not None:
            return hit, False
        with self.cache.locked(key):
            hit = self.cache.lookup(key)
            if hit is not None:
                return hit, False
            tmp = self.cache.partial(key)
            total = sum(int(objects[n]["Size"]) for n in names)
            progress = Progress(ref.uri, "s3", total, self.metrics)
            ok = False
            try:
                for n in names:
                    want = manifest[n]["sha256"] if manifest is not None else None
                    self._download(ref, n, objects[n], tmp / n, progress, want)
                check_tree(ref.uri, tmp, kind)
                ok = True
            except SourceError as exc:
                if "checksum" in exc.reason or "safetensors" in exc.reason or "pickle" in exc.reason:
                    self.cache.discard(key)  # corrupt bytes: the retry must not resume from them
                raise
            finally:
                progress.close(ok)
            return self.cache.commit(key, tmp), True

    def _manifest(self, ref: SourceRef, objects: dict[str, dict]) -> dict[str, dict] | None:
        """A published version's manifest files, each present in the store with its size; None for a plain source."""
        obj = objects.get(MANIFEST)
        if obj is None:
            if is_version(ref.uri):
                raise incomplete(ref.uri)
            return None
        if int(obj["Size"]) > 1 << 20:
            raise SourceError(ref.uri, f"{MANIFEST} is larger than 1 MiB")
        try:
            raw = self.client.get_object(Bucket=ref.where, Key=obj["Key"])["Body"].read()
        except Exception as exc:  # noqa: BLE001
            raise explain(f"{ref.uri} ({MANIFEST})", exc) from exc
        files = parse_manifest(ref.uri, raw)
        for name, info in files.items():
            if name not in objects:
                raise SourceError(ref.uri, f"{name}: listed in {MANIFEST} but not in the store")
            if int(objects[name]["Size"]) != info["size"]:
                raise SourceError(
                    ref.uri, f"{name}: {objects[name]['Size']} bytes in the store, {MANIFEST} says {info['size']}"
                )
        return files

    def _download(
        self, ref: SourceRef, name: str, obj: dict, dest: Path, progress: Progress, sha256: str | None = None
    ) -> None:
        from botocore.exceptions import BotoCoreError

        size, etag = int(obj["Size"]), str(obj.get("ETag", "")).strip('"')
        key = obj["Key"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        have = dest.stat().st_size if dest.exists() else 0
        if have > size:
            dest.unlink()
            have = 0
        progress.skip(have)
        if have < size:
            args: dict[str, Any] = {"Bucket": ref.where, "Key": key}
            if etag:
                args["IfMatch"] = etag
            if have:
                args["Range"] = f"bytes={have}-"
            try:
                resp = self.client.get_object(**args)
            except Exception as exc:  # noqa: BLE001
                raise explain(f"{ref.uri} ({name})", exc) from exc
            try:
                with open(dest, "ab") as fh:
                    for chunk in resp["Body"].iter_chunks(CHUNK):
                        fh.write(chunk)
                        progress.add(len(chunk))
            except BotoCoreError as exc:  # the connection broke mid-body: the size check below says how far it got
                log.warning("%s (%s): download interrupted: %s", ref.uri, name, exc)
            except OSError as exc:  # the cache's disk
                raise SourceError(ref.uri, f"{name}: cannot write the cache: {exc}") from exc
        got = dest.stat().st_size
        if got != size:
            raise SourceError(ref.uri, f"{name}: truncated download ({got} of {size} bytes); the next load resumes it")
        if _MD5_ETAG.match(etag) and md5_file(dest) != etag:
            raise SourceError(ref.uri, f"{name}: checksum mismatch (MD5 differs from the object's ETag {etag})")
        if sha256 is not None:
            if sha256_file(dest) != sha256:
                raise SourceError(ref.uri, f"{name}: checksum mismatch (sha256 differs from {MANIFEST})")
            return
        try:
            meta = self.client.head_object(Bucket=ref.where, Key=key).get("Metadata") or {}
        except Exception as exc:  # noqa: BLE001
            raise explain(f"{ref.uri} ({name})", exc) from exc
        want = meta.get("sha256")
        if want and sha256_file(dest) != want:
            raise SourceError(ref.uri, f"{name}: checksum mismatch (sha256 differs from x-amz-meta-sha256)")


def upload_dir(client: Any, local: Path, uri: str, ref: SourceRef, last: tuple[str, bytes] | None = None) -> str:
    """Publishes a directory's files under `uri` (weights first, adapter_config.json last, each with its sha256 as
    metadata so readers verify it), then `last` (name, bytes) if given: a version's manifest (`layout.py`), so a
    reader never finds a manifest before every file it names. Returns the URI."""
    files = sorted(
        (p for p in local.rglob("*") if p.is_file() and p.name != MANIFEST),
        key=lambda p: (p.name == "adapter_config.json", p.name),
    )

    def put(rel: str, body: Any, sha256: str) -> None:
        key = f"{ref.path}/{rel}" if ref.path else rel
        try:
            client.put_object(Bucket=ref.where, Key=key, Body=body, Metadata={"sha256": sha256})
        except Exception as exc:  # noqa: BLE001
            raise explain(uri, exc) from exc

    for p in files:
        with open(p, "rb") as fh:
            put(p.relative_to(local).as_posix(), fh, sha256_file(p))
    if last is not None:
        put(last[0], last[1], hashlib.sha256(last[1]).hexdigest())
    return uri
