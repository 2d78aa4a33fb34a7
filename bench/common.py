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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

LLAMA_32_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    tie_word_embeddings=True,
    rope_theta=500000.0,
    max_position_embeddings=131072,
)
LLAMA_31_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    tie_word_embeddings=False,
    rope_theta=500000.0,
    max_position_embeddings=131072,
)


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
