"""Llama-3.2-1B and Llama-3.1-8B shapes (HF `LlamaConfig` fields) that the GPU benchmarks build with random weights.

Kept apart from the scripts that use them so that every benchmark measures the same shapes; it imports nothing, so
both the GPU-only kernel bench (`gpu_llama.py`) and the CPU-smoked engine benches can load it.
"""

LLAMA_32_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    tie_word_embeddings=True,
    rope_theta=500000.0,
    max_position_embeddings=131072,
)
LLAMA_31_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    tie_word_embeddings=False,
    rope_theta=500000.0,
    max_position_embeddings=131072,
)
