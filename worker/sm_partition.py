"""SM partitions for co-serving: a CUDA stream whose kernels may run on only some of the GPU's SMs (green contexts).

Why: a lower stream priority only decides which *pending* thread blocks go first. Once training kernels hold every
SM, a serving kernel waits until enough training blocks retire, and a decode step is a few hundred small kernels,
so those waits add up to milliseconds of TPOT. A green context gives training a fixed subset of the SMs; the rest
never run a training block, so a serving kernel always finds free SMs at once and spreads onto the training SMs as
their blocks retire (serving stays in the ordinary context, which may use every SM).

The driver API (CUDA >= 12.4 driver; `cuGreenCtxStreamCreate` since 12.5) is called through ctypes, so there is no
extra dependency; anything missing raises `PartitionUnavailable` with the reason and callers run unpartitioned.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

CU_DEV_RESOURCE_TYPE_SM = 1
CU_GREEN_CTX_DEFAULT_STREAM = 0x1
CU_STREAM_NON_BLOCKING = 0x1
# CUdevResource is {type; _internal_padding[92]; union{sm; _oversize[48]}; ...}: 144 bytes up to CUDA 12.9 and a
# little more later. Every call here passes one resource, so an oversized zeroed buffer is safe for all versions.
_RESOURCE_BYTES = 1024
_SM_COUNT_OFFSET = 96  # CUdevSmResource.smCount, the first field of the union

_lock = threading.Lock()
_cache: dict[tuple[int, int, int], SmPartition] = {}


class PartitionUnavailable(RuntimeError):
    """This GPU, driver or build cannot give a stream its own SMs."""


@dataclass(frozen=True)
class SmPartition:
    """A stream restricted to `sms` of the device's `total_sms` SMs. `green_ctx` is kept alive with it."""

    stream: object  # torch.cuda.ExternalStream
    sms: int
    total_sms: int
    green_ctx: int


def _driver():
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise PartitionUnavailable(f"no CUDA driver library: {exc}") from exc


def _check(lib, rc: int, what: str) -> None:
    if rc == 0:
        return
    name = ctypes.c_char_p()
    try:
        lib.cuGetErrorName(rc, ctypes.byref(name))
    except Exception:  # noqa: BLE001 - the name is only for the message
        pass
    label = name.value.decode() if name.value else str(rc)
    raise PartitionUnavailable(f"{what} failed: {label}")


def sm_partition(device, sms: int, priority: int | None = None) -> SmPartition:
    """A stream of `priority` (default: the least urgent) whose kernels use at least `sms` SMs and no more than the
    driver's rounding of it (SM groups come in hardware granules: 8 SMs on Hopper). Cached per (device, sms,
    priority): green contexts are a driver resource, created once per process."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        raise PartitionUnavailable("not a CUDA device")
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    total = torch.cuda.get_device_properties(index).multi_processor_count
    if not 0 < sms < total:
        raise ValueError(f"an SM partition needs 0 < sms < {total} (the device's SMs), got {sms}")
    if priority is None:
        priority, _ = torch.cuda.Stream.priority_range()  # numerically greatest = least urgent
    key = (index, sms, priority)
    with _lock:
        if key in _cache:
            return _cache[key]
        part = _create(index, sms, priority, total)
        _cache[key] = part
        return part


def _create(index: int, sms: int, priority: int, total: int) -> SmPartition:
    import torch

    lib = _driver()
    version = ctypes.c_int()
    _check(lib, lib.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
    if version.value < 12050:
        raise PartitionUnavailable(f"green-context streams need a CUDA 12.5 driver, this one is {version.value}")
    for fn in ("cuDeviceGetDevResource", "cuDevSmResourceSplitByCount", "cuGreenCtxCreate", "cuGreenCtxStreamCreate"):
        if not hasattr(lib, fn):
            raise PartitionUnavailable(f"the driver has no {fn}")
    torch.cuda.init()
    _check(lib, lib.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    _check(lib, lib.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
    whole = ctypes.create_string_buffer(_RESOURCE_BYTES)
    _check(lib, lib.cuDeviceGetDevResource(dev, whole, CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource")
    group = ctypes.create_string_buffer(_RESOURCE_BYTES)
    rest = ctypes.create_string_buffer(_RESOURCE_BYTES)
    n = ctypes.c_uint(1)
    _check(
        lib,
        lib.cuDevSmResourceSplitByCount(group, ctypes.byref(n), whole, rest, ctypes.c_uint(0), ctypes.c_uint(sms)),
        "cuDevSmResourceSplitByCount",
    )
    if n.value != 1:
        raise PartitionUnavailable(f"the driver made {n.value} SM groups of {sms}, not one")
    got = ctypes.c_uint.from_buffer(group, _SM_COUNT_OFFSET).value
    desc = ctypes.c_void_p()
    _check(lib, lib.cuDevResourceGenerateDesc(ctypes.byref(desc), group, ctypes.c_uint(1)), "cuDevResourceGenerateDesc")
    gctx = ctypes.c_void_p()
    _check(lib, lib.cuGreenCtxCreate(ctypes.byref(gctx), desc, dev, CU_GREEN_CTX_DEFAULT_STREAM), "cuGreenCtxCreate")
    raw = ctypes.c_void_p()
    _check(
        lib,
        lib.cuGreenCtxStreamCreate(ctypes.byref(raw), gctx, CU_STREAM_NON_BLOCKING, ctypes.c_int(priority)),
        "cuGreenCtxStreamCreate",
    )
    stream = torch.cuda.ExternalStream(raw.value, device=torch.device("cuda", index))
    return SmPartition(stream=stream, sms=int(got) or sms, total_sms=total, green_ctx=int(gctx.value or 0))
