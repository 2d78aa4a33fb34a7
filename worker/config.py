"""Engine configuration: one flat dataclass shared by the worker CLI, the HTTP layer and the benchmarks.

Why flat: every knob maps 1:1 to a `lorafleet worker` flag and to a vLLM engine argument of the same meaning, so
operators can reason about both the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    model: str  # HF dir (config.json + *.safetensors + tokenizer) or a .gguf file
    dtype: str = "auto"  # auto|float32|bfloat16|float16 (auto: checkpoint dtype on GPU, float32 on CPU)
    device: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per-iteration token budget (chunked prefill)
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None  # explicit, else derived from kv_cache_fraction (GPU) / kv_cache_bytes (CPU)
    kv_cache_fraction: float = 0.5
    kv_cache_bytes: int = 256 << 20
    max_loras: int = 8  # GPU slots
    max_cpu_loras: int = 64
    max_lora_rank: int = 64
    adapter_roots: list[str] = field(default_factory=list)
    enforce_eager: bool = False
    prefill_graphs: bool = True  # with graphs on, steps with prefill tokens replay graphs too (cuda_graph.py)
    enable_prefix_caching: bool = False  # reuse KV of identical prompt prefixes (salted by adapter version)
    lora_admission: str = "slot_aware"  # slot_aware: GPU-resident adapters first, age-bounded; fifo: arrival order
    max_admission_wait_steps: int = 32  # steps a request may be overtaken by warmer ones before it goes first
    # launch step N before step N-1's tokens reach the host (llm_engine.py); None: on for CUDA, off on CPU
    async_scheduling: bool | None = None
    # GPU: RMSNorm (+ residual add), rotary and SiLU-and-mul as one Triton kernel each (layers/triton_elementwise.py)
    triton_elementwise: bool = True
    # serve an adapter that dominates the batch merged into a copy of the base projections (engine/merge_switch.py)
    merge_switch: bool = False
    seed: int = 0

    def validate(self) -> None:
        """Fails fast on settings that would otherwise surface as confusing errors deep inside a step."""
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_loras", "max_lora_rank"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras (every GPU slot is backed by a host copy)")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError("num_kv_blocks must be positive")
        if self.lora_admission not in ("slot_aware", "fifo"):
            raise ValueError(f"lora_admission must be slot_aware|fifo, got {self.lora_admission!r}")
        if self.max_admission_wait_steps < 0:
            raise ValueError("max_admission_wait_steps must be >= 0")
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise ValueError("kv_cache_fraction must be in (0, 1]")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError("async_scheduling must be a bool or None (auto)")
        if not isinstance(self.triton_elementwise, bool):
            raise ValueError("triton_elementwise must be a bool")
        if not isinstance(self.merge_switch, bool):
            raise ValueError("merge_switch must be a bool")


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_async_scheduling(flag: bool | None, device) -> bool:
    """Auto (None) turns async scheduling on where the forward runs on a GPU.

    There the host's per-step work (scheduling, inputs, token bookkeeping) is a third to a half of a small model's
    decode step, and overlapping it with the GPU raised the 1B shape's closed-loop max load 1.4-1.8x on an H200
    (bench/ENGINE_GPU.md). On CPU the forward and the host share the same cores, so there is nothing to overlap
    and outputs would only arrive a step later.
    """
    return flag if flag is not None else device.type == "cuda"


def resolve_dtype(dtype: str, device, checkpoint_dtype=None):
    """auto = the checkpoint's dtype on GPU (bf16 if unknown/fp32), float32 on CPU (CPU bf16 matmuls are slow)."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cpu":
        return torch.float32
    if checkpoint_dtype in (torch.float16, torch.bfloat16):
        return checkpoint_dtype
    return torch.bfloat16
