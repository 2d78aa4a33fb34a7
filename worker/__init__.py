"""LoRA Fleet worker: the serving + co-serving fine-tuning engine that runs in every worker pod."""
