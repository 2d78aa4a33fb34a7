"""Shared fixtures for the continual-learning tests: one tiny Llama checkpoint and a random PEFT adapter."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lorafleet.worker.testing import TinyLlamaSpec, build_peft_adapter, build_tiny_llama

torch.set_num_threads(1)

F32_EPS = float(torch.finfo(torch.float32).eps)


def f32_bound_close(got: torch.Tensor, want: torch.Tensor, n_terms: int) -> None:
    """Asserts two float32 results of the same math (summed in another order) agree within a float32 error bound.

    Reordering a sum of n float32 products changes it by at most ~n * eps * sum|terms| (Higham's gamma_n); the
    terms' magnitudes are bounded here by the reference's largest element, so the absolute tolerance is
    n * eps * max|want|. It holds on any x86 CPU and thread count, where a fixed atol (1e-7) depends on which
    kernel the BLAS library picks; it is still 10^3-10^4 times tighter than any bug that drops or doubles a term.
    """
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=n_terms * F32_EPS, atol=n_terms * F32_EPS * scale)


@pytest.fixture()
def grad_close():
    """f32_bound_close for a test's gradients (a fixture, since conftest modules are not imported by tests)."""
    return f32_bound_close


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("cl-tiny"), TinyLlamaSpec(), seed=0)


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, tiny_dir):
    return build_peft_adapter(tmp_path_factory.mktemp("cl-adapter") / "ad", tiny_dir, rank=4, alpha=8, seed=3, std=0.1)


@pytest.fixture()
def tiny_model(tiny_dir):
    from lorafleet.worker.loader import load_model

    model, _ = load_model(tiny_dir, torch.device("cpu"), torch.float32)
    return model


WORKER = """
import sys, time, torch
torch.set_num_threads(1)
from lorafleet.worker.api.testing import start_worker
w = start_worker(sys.argv[1], adapter_roots=[sys.argv[2]], max_num_batched_tokens=64, api={"feedback_adapters": ("*",)})
print(w.url, flush=True)
time.sleep(3600)
"""


def spawn_worker(
    model: Path, root: Path, train_dir: Path | None, worker_id: str | None = None
) -> tuple[subprocess.Popen, str]:
    """A real worker in its own process (so a test can SIGKILL it), training data under `train_dir`; None: the
    pool layout, under the adapter root's `.lorafleet-training/workers/<worker_id>` (as on a cluster)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_CBWR="COMPATIBLE")
    env.pop("LORAFLEET_TRAINING_DIR", None)
    if train_dir is not None:
        env["LORAFLEET_TRAINING_DIR"] = str(train_dir)
    if worker_id is not None:
        env["LORAFLEET_WORKER_ID"] = worker_id
    p = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(model), str(root)], stdout=subprocess.PIPE, env=env, text=True
    )
    url = p.stdout.readline().strip()
    assert url.startswith("http://"), url
    return p, url


def wait_for(fn, timeout=60.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(interval)
    return fn()


@pytest.fixture()
def worker_process():
    """`spawn(model, root, train_dir)` -> (process, url); every process still alive at the end is killed."""
    procs: list[subprocess.Popen] = []

    def spawn(
        model: Path, root: Path, train_dir: Path | None, worker_id: str | None = None
    ) -> tuple[subprocess.Popen, str]:
        p, url = spawn_worker(model, root, train_dir, worker_id)
        procs.append(p)
        return p, url

    yield spawn
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(30)


@pytest.fixture()
def wait_until():
    """`wait_until(fn, timeout, interval)`: polls until fn() is truthy; returns its last value."""
    return wait_for
