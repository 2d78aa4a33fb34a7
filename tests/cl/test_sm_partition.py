"""SM partitions (worker/sm_partition.py): refused with a reason where there is no GPU, bad sizes are a clear error,
and on a GPU a partition stream really runs on fewer SMs, eagerly and as a CUDA graph captured on it."""

from __future__ import annotations

import pytest
import torch
from lorafleet.worker.sm_partition import PartitionUnavailable, sm_partition


def test_no_partition_without_a_gpu():
    with pytest.raises(PartitionUnavailable, match="not a CUDA device"):
        sm_partition("cpu", 8)


def test_graphed_trainer_refuses_an_unknown_placement(tiny_dir, adapter_dir):
    from lorafleet.worker.loader import load_model
    from lorafleet.worker.training.graphed import GraphedTrainer
    from lorafleet.worker.training.lora_context import TrainableLoRA
    from lorafleet.worker.training.trainer import LoRATrainer, OptimConfig

    model, _ = load_model(tiny_dir, torch.device("cpu"), torch.float32)
    t = LoRATrainer(model, TrainableLoRA.from_peft(model.shape, adapter_dir), OptimConfig())
    with pytest.raises(ValueError, match="must be one of"):
        GraphedTrainer(t, stream="gpu0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_partition_stream_runs_on_fewer_sms():
    dev = torch.device("cuda", 0)
    total = torch.cuda.get_device_properties(dev).multi_processor_count
    with pytest.raises(ValueError, match="0 < sms"):
        sm_partition(dev, total)
    try:
        part = sm_partition(dev, 16)
    except PartitionUnavailable as exc:
        pytest.skip(f"no green contexts here: {exc}")
    assert part.total_sms == total and 16 <= part.sms < total
    assert sm_partition(dev, 16) is part  # one green context per (device, size, priority)
    x = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)

    def timed(stream, fn) -> float:
        with torch.cuda.stream(stream):
            fn()
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(5):
                fn()
            b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b)

    full = timed(torch.cuda.Stream(), lambda: x @ x)
    restricted = timed(part.stream, lambda: x @ x)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(part.stream):
        x @ x
    with torch.cuda.graph(g, stream=part.stream):
        y = x @ x
    graphed = timed(part.stream, g.replay)
    torch.testing.assert_close(y, x @ x)
    # 16 of ~132 SMs: ~8x slower in theory; a wide margin keeps this a behaviour check, not a timing target
    assert restricted > 2.5 * full and graphed > 2.5 * full, (full, restricted, graphed)
