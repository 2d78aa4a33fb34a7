"""Model building blocks: norm, rotary, attention contexts (paged / dense), LoRA-aware linear, activation."""
