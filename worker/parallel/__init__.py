"""Tensor parallelism: one worker process per GPU, each holding a 1/tp shard of the base model and of every adapter.

The pieces, one file each:
- `group.py`: the process group and the three autograd-aware collectives every sharded layer is built from.
- `plan.py`: pure shard arithmetic (which heads, rows, columns and vocabulary ids a rank holds).
- `layers.py`: column- and row-parallel linear layers, the vocabulary-parallel embedding and head, and
  `shard_llama`, which turns a loaded `LlamaForCausalLM` into one rank's shard in place.
- `lora.py`: LoRA sharded the way vLLM's `fully_sharded_loras` does it (shrink on the sharded side, one collective
  of the rank-r intermediate, expand sharded), for serving segments and for dense training.
"""
