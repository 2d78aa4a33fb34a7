"""`lorafleet drain-wait`: the worker container's preStop hook, which holds the process up until it is drained.

When a worker pod is deleted (scale-down, rollout, eviction), the operator sees its deletionTimestamp, moves each
adapter to another worker (load there, route there, un-route here), waits for the in-flight requests to finish and
unloads it here. The hook returns once the worker holds no adapter any more (or after `--timeout`), so SIGTERM only
reaches a process nobody routes to. The local kubelet shim runs the same wait for its processes.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from pathlib import Path


def held_adapters(port: int, token: str | None, host: str = "127.0.0.1") -> list[str] | None:
    """Names the worker reports in `/v1/adapters`; None when it does not answer (nothing left to wait for)."""
    req = urllib.request.Request(f"http://{host}:{port}/v1/adapters")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=2.0) as resp:
            body = json.loads(resp.read() or b"{}")
    except (OSError, ValueError, urllib.error.URLError):
        return None
    items = body.get("data", []) if isinstance(body, dict) else body
    return [str(a.get("name") if isinstance(a, dict) else a) for a in items or []]


def wait_drained(port: int, token: str | None, timeout: float, poll: float = 0.25) -> bool:
    """True once the worker holds no adapter (or stopped answering) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        held = held_adapters(port, token)
        if not held:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lorafleet drain-wait", description=__doc__)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--admin-token-file", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=80.0, help="give up (and let SIGTERM come) after this long")
    args = p.parse_args(argv)
    token = None
    if args.admin_token_file is not None and args.admin_token_file.exists():
        token = args.admin_token_file.read_text().strip()
    wait_drained(args.port, token, args.timeout)
    return 0  # a hook that fails only delays the kill; the wait itself is the point
