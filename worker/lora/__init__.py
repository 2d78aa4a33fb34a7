"""Batched LoRA: kernels (Punica/S-LoRA contract), adapter format, adapter store tiers."""
