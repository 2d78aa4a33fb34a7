"""Custom resources for local fleets (used by `lorafleet up`, the operator tests and the benchmark).

They point at host paths, which is what local mode means: the kubelet shim runs the workers on this machine, so a
`file://` source is read by the worker process directly (and checked for existence by the operator).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def basemodel(name: str, model: Path | str, replicas: int = 2, **limits: int) -> dict[str, Any]:
    return {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "BaseModel",
        "metadata": {"name": name},
        "spec": {
            "source": {"uri": f"file://{model}"},
            "dtype": "float32",
            "replicas": replicas,
            "worker": {"resources": {"limits": {"nvidia.com/gpu": 1}}},
            "limits": {"maxAdapters": 4, "maxCpuAdapters": 16, "maxRank": 16, **limits},
        },
    }


def adapter(name: str, base: str, path: Path | str, replicas: int | dict[str, Any] = 1, **spec: Any) -> dict[str, Any]:
    """A LoRAAdapter; `replicas` is a fixed count or the CRD's {min, max, auto} object."""
    uri = path if isinstance(path, str) and "://" in path else f"file://{path}"
    reps = replicas if isinstance(replicas, dict) else {"min": replicas}
    return {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "LoRAAdapter",
        "metadata": {"name": name},
        "spec": {"baseModel": base, "source": {"uri": uri}, "replicas": reps, **spec},
    }
