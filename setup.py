"""Maps the design card's folders onto the `lorafleet` namespace.

`operator/` must never be importable as top-level `operator` (it would shadow the standard library), so every
package found under `operator/` and `worker/` is installed under `lorafleet.`.
"""

from setuptools import find_packages, setup

_MAPPED = {"operator": "lorafleet.operator", "worker": "lorafleet.worker"}

packages = ["lorafleet", *(f"lorafleet.{p}" for p in find_packages(where="lorafleet"))]
for folder, name in _MAPPED.items():
    packages += [name, *(f"{name}.{p}" for p in find_packages(where=folder))]

setup(
    packages=packages,
    package_dir={"lorafleet": "lorafleet", **{name: folder for folder, name in _MAPPED.items()}},
    package_data={"lorafleet": ["py.typed"]},
)
