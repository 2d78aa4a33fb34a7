"""GPU check of the graphed co-serving path: the CUDA-graph test of tests/cl/test_graphed.py, run without pytest's
conftest (the GPU machine does not have the repo installed)."""

import importlib.util
import pathlib
import sys
import tempfile

sys.path.insert(0, "bench")
import cl_gpu  # noqa: F401,E402  (the import shim)
from lorafleet.worker.testing import TinyLlamaSpec, build_peft_adapter, build_tiny_llama  # noqa: E402

spec = importlib.util.spec_from_file_location("tg", "tests/cl/test_graphed.py")
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
d = pathlib.Path(tempfile.mkdtemp())
tiny = build_tiny_llama(d / "m", TinyLlamaSpec(), seed=0)
ad = build_peft_adapter(d / "ad", tiny, rank=4, alpha=8, seed=3, std=0.1)
for split, stream in ((None, "serving"), (1, "serving"), (None, "beside"), (None, "partition")):
    m.test_cuda_graph_replays_equal_eager(ad, tiny, split, stream)
print("GPU graph test OK")
