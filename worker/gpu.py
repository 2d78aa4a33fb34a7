"""GPU utilisation, memory and power from NVML (nvidia-ml-py), exposed as a Prometheus collector.

Why a collector rather than gauges updated in a loop: NVML is queried only when Prometheus scrapes, so an idle worker
costs nothing and the numbers are as fresh as the scrape. Where there is no GPU, `pynvml.nvmlInit()` raises
`pynvml.NVMLError` (`NVMLError_LibraryNotFound` on a machine without the driver); the collector then yields no
families at all: the series are absent, not zero and not an error.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


@dataclass
class GpuSample:
    index: int
    name: str
    uuid: str
    utilization_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    power_watts: float | None


class Nvml:
    """Lazily initialised NVML handle; `available` is False (and stays so) when NVML cannot start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._initialised = False
        self._available = False
        self._pynvml = None

    @property
    def available(self) -> bool:
        self._init()
        return self._available

    def _init(self) -> None:
        with self._lock:
            if self._initialised:
                return
            self._initialised = True
            try:
                import pynvml

                pynvml.nvmlInit()
            except ImportError:
                log.info("nvidia-ml-py not installed: GPU metrics disabled")
                return
            except Exception as exc:  # pynvml.NVMLError and its subclasses
                log.info("NVML unavailable (%s): GPU metrics disabled", exc)
                return
            self._pynvml = pynvml
            self._available = True

    def sample(self) -> list[GpuSample]:
        if not self.available:
            return []
        nv = self._pynvml
        samples: list[GpuSample] = []
        try:
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError as exc:
            log.warning("NVML device count failed: %s", exc)
            return []
        for i in range(count):
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
                name = nv.nvmlDeviceGetName(h)
                uuid = nv.nvmlDeviceGetUUID(h)
                util = nv.nvmlDeviceGetUtilizationRates(h)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                try:
                    power: float | None = nv.nvmlDeviceGetPowerUsage(h) / 1000.0  # milliwatts
                except nv.NVMLError:
                    power = None
            except nv.NVMLError as exc:
                log.warning("NVML query of GPU %d failed: %s", i, exc)
                continue
            samples.append(
                GpuSample(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                    utilization_percent=float(util.gpu),
                    memory_used_bytes=int(mem.used),
                    memory_total_bytes=int(mem.total),
                    power_watts=power,
                )
            )
        return samples


class GpuCollector(Collector):
    """Yields `lorafleet_gpu_*` gauges per GPU at scrape time; nothing at all without NVML."""

    def __init__(self, nvml: Nvml | None = None) -> None:
        self.nvml = nvml or Nvml()

    def describe(self) -> list:
        # Describing nothing keeps registration from calling collect() (and NVML) at import time.
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        samples = self.nvml.sample()
        if not samples:
            return
        labels = ["gpu", "uuid", "name"]
        util = GaugeMetricFamily("lorafleet_gpu_utilization_percent", "GPU utilisation (NVML), percent.", labels=labels)
        used = GaugeMetricFamily("lorafleet_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=labels)
        total = GaugeMetricFamily("lorafleet_gpu_memory_total_bytes", "GPU memory in total (NVML).", labels=labels)
        power = GaugeMetricFamily("lorafleet_gpu_power_watts", "GPU power draw (NVML).", labels=labels)
        for s in samples:
            key = [str(s.index), s.uuid, s.name]
            util.add_metric(key, s.utilization_percent)
            used.add_metric(key, s.memory_used_bytes)
            total.add_metric(key, s.memory_total_bytes)
            if s.power_watts is not None:
                power.add_metric(key, s.power_watts)
        yield from (util, used, total, power)


def prioritise_serving_stream(device) -> object | None:
    """Makes the calling thread's current CUDA stream one of the highest priority and returns it (None on CPU).

    Why: co-serving fine-tuning launches its graphs on a stream of the lowest priority (training/graphed.py). The
    GPU's block scheduler prefers pending blocks of higher-priority streams, so serving kernels go first whenever
    both are queued and training only fills the gaps; with both on equal priorities serving kernels would queue
    behind whole training kernels. The current stream is per thread, so this is called once by the engine thread.
    """
    import os

    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    if os.environ.get("LORAFLEET_SERVING_STREAM", "priority") == "default":
        return None  # operators (and A/B benchmarks) can keep serving on the default stream
    torch.cuda.synchronize(device)  # work queued on the default stream (loading, captures) is done before switching
    _least, greatest = torch.cuda.Stream.priority_range()
    stream = torch.cuda.Stream(device=device, priority=greatest)
    torch.cuda.set_stream(stream)
    return stream
