"""Serving engine: sequences, block manager, scheduler, model runner, sampler, LLMEngine (nano-vllm's shape)."""
