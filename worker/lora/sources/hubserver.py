"""A local stand-in for the Hugging Face hub's HTTP API, for tests and benchmarks (the hub is not reachable here).

It serves, for repos the test writes (`add_repo`), the two routes huggingface_hub uses to download: repo info with
file metadata (`/api/models/{repo}/revision/{rev}?blobs=true`) and file resolve (`HEAD`/`GET
/{repo}/resolve/{rev}/{file}`, with `X-Repo-Commit`, `ETag`, sizes and `Range`), plus a bearer token check and
switches to misbehave (`truncate`: send only part of a file, then close) for the bad-input tests.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


@dataclass
class HubRepo:
    files: dict[str, bytes]
    commit: str
    branches: dict[str, str] = field(default_factory=dict)


class HubServer:
    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.repos: dict[str, HubRepo] = {}
        self.truncate: dict[str, int] = {}  # filename -> bytes to send before closing the connection
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                hub._serve(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                hub._serve(self, body=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add_repo(self, repo_id: str, directory: Path, branch: str = "main") -> str:
        """Publishes every file of `directory` as a new commit of `repo_id` on `branch`; returns the commit."""
        files = {
            p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
        }
        commit = hashlib.sha1(
            json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
        ).hexdigest()
        repo = self.repos.setdefault(repo_id, HubRepo(files, commit))
        repo.files, repo.commit = files, commit
        repo.branches[branch] = commit
        repo.branches[commit] = commit
        return commit

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- routes ----
    @staticmethod
    def _meta(name: str, data: bytes) -> dict:
        blob = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        out = {"rfilename": name, "size": len(data), "blobId": blob}
        if name.endswith(LFS_SUFFIXES):
            out["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        return out

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, body: bool) -> None:
        msg = json.dumps({"error": code}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(msg)))
        h.end_headers()
        if body:
            h.wfile.write(msg)

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append(f"{h.command} {path}")
        if self.token is not None and h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._error(h, 401, "RepoNotFound", body)
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/") :]
            repo_id, _, rev = rest.partition("/revision/")
            repo = self.repos.get(repo_id)
            if repo is None:
                return self._error(h, 404, "RepoNotFound", body)
            commit = repo.branches.get(rev or "main")
            if commit is None:
                return self._error(h, 404, "RevisionNotFound", body)
            info = {"id": repo_id, "sha": commit, "siblings": [self._meta(n, d) for n, d in sorted(repo.files.items())]}
            data = json.dumps(info).encode()
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if body:
                h.wfile.write(data)
            return None
        parts = path.strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(h, 404, "EntryNotFound", body)
        repo_id, rev, name = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", body)
        commit = repo.branches.get(rev)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", body)
        if name not in repo.files:
            return self._error(h, 404, "EntryNotFound", body)
        data = repo.files[name]
        meta = self._meta(name, data)
        etag = meta.get("lfs", {}).get("sha256") or meta["blobId"]
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0] or 0)
        chunk = data[start:]
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", commit)
        h.send_header("ETag", f'"{etag}"')
        if "lfs" in meta:
            h.send_header("X-Linked-Etag", f'"{etag}"')
            h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("Content-Length", str(len(chunk)))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if body:
            cut = self.truncate.get(name)
            if cut is not None and cut < len(chunk):
                h.wfile.write(chunk[:cut])
                h.wfile.flush()
                h.close_connection = True
                return None
            h.wfile.write(chunk)
        return None
