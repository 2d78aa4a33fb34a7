"""`hf://org/repo[@revision]` sources through huggingface_hub, against the hub or any endpoint that serves its API.

`HF_ENDPOINT` (or the resolver's `endpoint`) picks the server and `HF_TOKEN` authenticates, both read when a source
is fetched. The revision (branch, tag or commit; default `main`) is resolved to its commit first, and the cache key
is that commit, so a moved branch is a new entry and a pinned commit is downloaded once. Files are fetched with
`hf_hub_download` into the entry's temporary directory (the library resumes its own `.incomplete` files), then each
is checked against the size and hash the hub lists for it: the LFS sha256, or the git blob id for small files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lorafleet.worker.lora.sources.cache import CacheKey, SourceCache
from lorafleet.worker.lora.sources.errors import SourceError
from lorafleet.worker.lora.sources.progress import Progress, SourceMetrics
from lorafleet.worker.lora.sources.uri import SourceRef
from lorafleet.worker.lora.sources.verify import check_tree, git_blob_sha1, select_files, sha256_file


def explain(uri: str, exc: BaseException) -> SourceError:
    """A huggingface_hub failure as a SourceError that says what a user can fix."""
    from huggingface_hub import errors

    if isinstance(exc, errors.RevisionNotFoundError):
        return SourceError(uri, "revision not found in the repository")
    if isinstance(exc, errors.EntryNotFoundError | errors.RemoteEntryNotFoundError):
        return SourceError(uri, f"file not found in the repository ({exc})")
    if isinstance(exc, errors.GatedRepoError):
        return SourceError(uri, "gated repository: the worker's HF_TOKEN has no access")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return SourceError(uri, "repository not found (or HF_TOKEN has no access to it)")
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return SourceError(uri, "HF_HUB_OFFLINE is set on this worker; hf:// sources need the hub")
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        if status in (401, 403):
            return SourceError(uri, f"access denied (HTTP {status}): check the worker's HF_TOKEN")
        return SourceError(uri, f"hub error HTTP {status}")
    name = type(exc).__name__
    if "Protocol" in name or "IncompleteRead" in name or "ChunkedEncoding" in name:
        return SourceError(uri, f"truncated download ({exc}); the next load resumes it")
    if "Connect" in name or "Timeout" in name or isinstance(exc, OSError):
        return SourceError(uri, f"hub endpoint unreachable ({name}: {exc})")
    return SourceError(uri, f"hub request failed ({name}: {exc})")


class HFSource:
    scheme = "hf"

    def __init__(
        self, cache: SourceCache, metrics: SourceMetrics, endpoint: str | None = None, token: str | None = None
    ) -> None:
        self.cache = cache
        self.metrics = metrics
        self._endpoint = endpoint
        self._token = token

    @property
    def endpoint(self) -> str | None:
        return self._endpoint or os.environ.get("HF_ENDPOINT") or None

    @property
    def token(self) -> str | None:
        return self._token or os.environ.get("HF_TOKEN") or None

    def _info(self, ref: SourceRef) -> Any:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self.token)
        return api.model_info(ref.where, revision=ref.revision, files_metadata=True, timeout=30)

    def fetch(self, ref: SourceRef, kind: str) -> tuple[Path, bool]:
        """(verified directory, whether it was downloaded now rather than found in the cache)."""
        from huggingface_hub import hf_hub_download

        try:
            info = self._info(ref)
        except Exception as exc:  # noqa: BLE001 - every hub failure becomes a SourceError naming the source
            raise explain(ref.uri, exc) from exc
        siblings = {s.rfilename: s for s in info.siblings or []}
        names = select_files(ref.uri, siblings, kind)
        key = CacheKey("hf", ref.uri, str(info.sha))
        hit = self.cache.lookup(key)
        if hit is not None:
            return hit, False
        with self.cache.locked(key):
            hit = self.cache.lookup(key)
            if hit is not None:
                return hit, False
            tmp = self.cache.partial(key)
            total = sum(int(siblings[n].size or 0) for n in names)
            progress = Progress(ref.uri, "hf", total, self.metrics)
            ok = False
            try:
                for n in names:
                    sib = siblings[n]
                    before = (tmp / n).stat().st_size if (tmp / n).exists() else 0
                    try:
                        hf_hub_download(
                            ref.where,
                            n,
                            revision=str(info.sha),
                            local_dir=str(tmp),
                            endpoint=self.endpoint,
                            token=self.token,
                            etag_timeout=30,
                        )
                    except Exception as exc:  # noqa: BLE001
                        raise explain(f"{ref.uri} ({n})", exc) from exc
                    got = (tmp / n).stat().st_size
                    progress.add(max(0, got - before))
                    self._check(ref, n, sib, tmp / n)
                shutil.rmtree(tmp / ".cache", ignore_errors=True)  # the library's resume bookkeeping
                check_tree(ref.uri, tmp, kind)
                ok = True
            except SourceError as exc:
                if "checksum" in exc.reason or "safetensors" in exc.reason or "size" in exc.reason:
                    self.cache.discard(key)
                raise
            finally:
                progress.close(ok)
            return self.cache.commit(key, tmp), True

    @staticmethod
    def _check(ref: SourceRef, name: str, sib: Any, path: Path) -> None:
        size = path.stat().st_size
        lfs = getattr(sib, "lfs", None)
        want_size = (lfs.size if lfs is not None else None) or sib.size
        if want_size is not None and size != int(want_size):
            raise SourceError(ref.uri, f"{name}: size {size} differs from the hub's {want_size}")
        if lfs is not None and lfs.sha256:
            if sha256_file(path) != lfs.sha256:
                raise SourceError(ref.uri, f"{name}: checksum mismatch (sha256 differs from the hub's LFS sha256)")
        elif sib.blob_id and git_blob_sha1(path) != sib.blob_id:
            raise SourceError(ref.uri, f"{name}: checksum mismatch (git blob id differs from the hub's)")
