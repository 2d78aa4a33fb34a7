"""Run engine / training tests on the GPU machine, where the repo is not installed and the cluster-side packages
(kubernetes, kopf) are absent: make `lorafleet.worker` importable from the checkout (the same shim as the benches)
and stop conftest discovery below `tests/` so the control-plane fixtures are never imported.

Usage there: `python3 bench/gpu_pytest.py tests/cl/test_fused.py -k gpu` (any pytest arguments).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    import lorafleet

    lorafleet.__path__.append(str(ROOT))
    import pytest

    targets = [a for a in argv if not a.startswith("-") and Path(a).exists()]
    first = Path(targets[0]) if targets else ROOT / "tests" / "cl"
    cut = first if first.is_dir() else first.parent
    return int(pytest.main([f"--confcutdir={cut}", "-p", "no:cacheprovider", *argv]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
