"""What every benchmark shares: the model shapes, the provenance of a result file, and a step log.

Import: benchmarks import the installed `lorafleet` package, never the checkout through `sys.path`. On a machine
without it installed (the GPU machine), install it once, code only, into a folder on `PYTHONPATH`:
`pip install --no-deps --no-build-isolation --target /tmp/lf . && export PYTHONPATH=/tmp/lf:$PWD` (bench/ENGINE_GPU.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lorafleet.worker.testing import StepLog  # noqa: F401  (re-exported: the benchmarks' step log)

# one definition of the shapes (llama_shapes.py imports nothing, so the GPU-only kernel bench loads it too)
from bench.llama_shapes import LLAMA_31_8B, LLAMA_32_1B  # noqa: F401  (re-exported)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def commit() -> str | None:
    """The checkout's commit (None outside a git checkout, e.g. a copied tree)."""
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
