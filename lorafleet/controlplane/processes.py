"""Starts and reliably stops the control plane's child processes.

Every child runs in its own process group (so a component's helpers die with it) and, when started from the main
thread, with PR_SET_PDEATHSIG so the kernel kills it even if Python itself is SIGKILLed. Clean exits, SIGTERM and
SIGHUP stop every live supervisor through `atexit` and chained signal handlers; SIGINT becomes KeyboardInterrupt,
which unwinds through the context managers and fixtures that own them.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from types import FrameType

_PR_SET_PDEATHSIG = 1
try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - non-glibc platforms
    _libc = None

_live: weakref.WeakSet[Supervisor] = weakref.WeakSet()
_handlers_installed = False
_previous: dict[int, object] = {}


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _stop_everything() -> None:
    for supervisor in list(_live):
        supervisor.stop()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _stop_everything()
    previous = _previous.get(signum)
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    """atexit once; SIGTERM/SIGHUP handlers once, from the main thread (the only place Python allows it)."""
    global _handlers_installed
    if not _handlers_installed:
        atexit.register(_stop_everything)
        _handlers_installed = True
    if not _previous and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            _previous[signum] = signal.getsignal(signum)
            signal.signal(signum, _on_signal)


class ProcessFailed(RuntimeError):
    """A component exited while we were waiting for it; the message carries the tail of its log."""


class Supervisor:
    """Owns a set of named child processes whose output goes to `<log_dir>/<name>.log`."""

    def __init__(self, log_dir: Path, die_with_parent: bool = True) -> None:
        self.log_dir = log_dir
        self.die_with_parent = die_with_parent
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        log_dir.mkdir(parents=True, exist_ok=True)
        _install_handlers()
        _live.add(self)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")
        use_pdeathsig = self.die_with_parent and threading.current_thread() is threading.main_thread()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent if use_pdeathsig else None,
            )
        finally:
            log.close()
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 25) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise ProcessFailed(f"{name} exited with {proc.returncode}; last log lines:\n{self.log_tail(name)}")

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items() if p.poll() is None}

    def stop(self, timeout: float = 8.0) -> None:
        """Stops every component but the first (etcd: what all the others store into) together, then the first.

        SIGTERM to each process group, newest first, then one shared deadline per phase: whatever is still alive
        `timeout` seconds later gets SIGKILL. Why not one by one: then a component slow to honour SIGTERM delays
        every later one by its full timeout, and on a loaded 2-core CI machine five such waits add up to more
        than the 30 s an interrupted owner is allowed. Together it takes at most about 2 x `timeout`."""
        procs = list(self.procs.items())[::-1]
        for phase in (procs[:-1], procs[-1:]):
            for _, proc in phase:
                _signal_group(proc, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for name, proc in phase:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    print(
                        f"[controlplane] {name} still running {timeout:.0f}s after SIGTERM; killing",
                        file=sys.stderr,
                        flush=True,
                    )
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
        self.procs.clear()
        _live.discard(self)


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
