"""Run engine / training tests on the GPU machine, where the cluster-side packages (kubernetes, kopf) are absent:
stop conftest discovery below `tests/` so the control-plane fixtures are never imported. `lorafleet` must be
importable (installed code-only with `pip --no-deps --target`, bench/common.py).

Usage there: `python3 bench/gpu_pytest.py tests/cl/test_graphed.py -k gpu` (any pytest arguments).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    import pytest

    targets = [a for a in argv if not a.startswith("-") and Path(a).exists()]
    first = Path(targets[0]) if targets else ROOT / "tests" / "cl"
    cut = first if first.is_dir() else first.parent
    return int(pytest.main([f"--confcutdir={cut}", "-p", "no:cacheprovider", *argv]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
