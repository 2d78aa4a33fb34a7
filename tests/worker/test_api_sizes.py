"""`/v1/adapters` reports each adapter's size, through the real API and the real engine on the tiny Llama (CPU).

Why it matters: the operator packs adapters onto workers by these bytes against `limits.adapterMemoryBytes`; a size
that is off (or absent, so the operator falls back to 64 MiB) makes it over- or under-pack. What is proven: a
host-resident adapter reports exactly its weights' bytes in the engine's dtype (counted here from the safetensors
file, independently of the engine); one evicted to the disk tier reports its weight file's size; the operator's own
reader (parse_adapters + adapter_bytes) turns the listing into the same numbers.
"""

from __future__ import annotations

import os

import httpx
import pytest
from safetensors import safe_open

TOKEN = "size-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def worker(tiny_model, adapter_root, adapters):
    from lorafleet.worker.api.testing import start_worker

    # one host copy: loading a second adapter pushes the first to the disk tier
    w = start_worker(
        str(tiny_model),
        served_model_name="tiny",
        admin_token=TOKEN,
        adapter_roots=[str(adapter_root)],
        max_loras=1,
        max_cpu_loras=1,
        max_lora_rank=16,
        block_size=4,
        num_kv_blocks=128,
    )
    yield w
    w.close()


def weight_bytes_fp32(adapter_dir) -> int:
    """LoRA A/B bytes as the engine holds them on CPU (float32), read straight from the file."""
    total = 0
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if "lora_A" in key or "lora_B" in key:
                total += f.get_slice(key).get_shape()[0] * f.get_slice(key).get_shape()[1] * 4
    return total


def listing(client) -> dict:
    r = client.get("/v1/adapters", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def test_sizes_by_tier_and_operator_reading(worker, adapters):
    from lorafleet.operator.capacity import adapter_bytes
    from lorafleet.operator.workerclient import parse_adapters

    with httpx.Client(base_url=worker.url, timeout=60) as client:
        for name in ("ad-r4", "ad-r16rs"):
            r = client.post(
                "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapters[name])}, headers=AUTH
            )
            assert r.status_code == 200, r.text
        body = listing(client)

    entries = {a["name"]: a for a in body["data"]}
    # the newest load is host-resident: exactly its A/B tensors in fp32
    resident = entries["ad-r16rs"]
    assert resident["tier"] == "host"
    assert resident["size_bytes"] == weight_bytes_fp32(adapters["ad-r16rs"])
    # rank 16 on every projection of the tiny model: more than a KiB, and 4x the rank-4 adapter's weights
    assert resident["size_bytes"] == 4 * weight_bytes_fp32(adapters["ad-r4"]) > 1024
    # the first was pushed out of the single host slot: the weight file's size on disk (header included)
    evicted = entries["ad-r4"]
    assert evicted["tier"] == "disk"
    assert evicted["size_bytes"] == os.path.getsize(adapters["ad-r4"] / "adapter_model.safetensors")
    assert evicted["size_bytes"] > weight_bytes_fp32(adapters["ad-r4"])  # the file: fp32 tensors + a JSON header

    assert body["adapter_memory_bytes"] is None  # the engine has no byte budget, only max_cpu_loras
    assert body["max_cpu_loras"] == 1
    assert body["adapter_bytes_used"] == resident["size_bytes"] + evicted["size_bytes"]

    # the operator reads the same bytes from the same answer
    infos = {i.name: i for i in parse_adapters(body)}
    spec = {"spec": {"source": {"uri": "s3://bucket/not-local"}}}  # no files to fall back on
    assert adapter_bytes(spec, [infos["ad-r16rs"]]) == resident["size_bytes"]
    assert adapter_bytes(spec, [infos["ad-r4"]]) == evicted["size_bytes"]
