"""What every benchmark shares: the model shapes, the provenance of a result file, and a step log.

Imports: a benchmark runs as `python bench/<script>.py`, so its own folder is on `sys.path` and it imports its
siblings by module name (`import common`, `import cl_gpu`); `lorafleet` is the installed package. No script edits
`sys.path` (the checkout's root on it would let `operator/` shadow the standard library). Where the package is
not installed (the GPU machine), install it once, code only, and put that folder on `PYTHONPATH`:

    T=$(mktemp -d); pip install -q --no-deps --no-build-isolation --target "$T" . && export PYTHONPATH="$T"

Results: one current file per benchmark under `bench/results/`, with `command`, `device`, `commit`, `metrics`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# one definition of the shapes (llama_shapes.py imports nothing, so the GPU-only kernel bench loads it too)
from llama_shapes import LLAMA_31_8B, LLAMA_32_1B  # noqa: F401  (re-exported)
from lorafleet.worker.testing import StepLog  # noqa: F401  (re-exported: the benchmarks' step log)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def commit() -> str | None:
    """The checkout's commit: LORAFLEET_COMMIT where the tree is a copy without git, else HEAD (None if neither)."""
    if os.environ.get("LORAFLEET_COMMIT"):
        return os.environ["LORAFLEET_COMMIT"]
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, text=True, stderr=subprocess.DEVNULL
        ).strip()
    except Exception:  # noqa: BLE001
        return None


def device_info(device: str) -> dict:
    """Torch version, device string and, on CUDA, the GPU's name: what a result was measured on."""
    import torch

    d = {"torch": torch.__version__, "device": device}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        d["name"] = torch.cuda.get_device_name(0)
    return d


def provenance(script: str, argv: list[str] | None, device: str) -> dict:
    """The header of every result file: the command that made it, the device, the commit."""
    args = argv if argv is not None else sys.argv[1:]
    return {"command": " ".join([f"bench/{script}", *args]), "device": device_info(device), "commit": commit()}


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
