"""Short GPU probe of the graphed co-serving job (fine-tuning alone, split and whole pieces), with a stack dump if it
stalls; used to debug bench/cl_gpu.py on the device machine."""

import faulthandler
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, "bench")
import cl_gpu as B  # noqa: E402
import torch  # noqa: E402

faulthandler.dump_traceback_later(150, exit=True)
layers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
cfg = B.Cfg(False, "cuda")
w = Path(tempfile.mkdtemp())
eng, root = B.setup(cfg, w)
eng._bench_graphs = "auto"
eng._bench_graph_layers = layers or None
from lorafleet.worker.gpu import prioritise_serving_stream  # noqa: E402

prioritise_serving_stream(eng.device)
job = B.make_job(eng, root, "ft", record=False)
B.feed(job, cfg, 64, seed=5)
t0 = time.perf_counter()
for i in range(40):
    job.scheduler.plan(cfg.budget, 0, False)
    u = job.work(cfg.budget)
    torch.cuda.synchronize()
    g = job.graphed
    print(
        i,
        f"{time.perf_counter() - t0:.3f}s",
        u,
        job.trainer.step,
        job.sequence_tokens,
        len(g.pending),
        g.active,
        g.graph_replays,
        g.eager_runs,
        job.phase,
        job.message,
        flush=True,
    )
