"""Continual learning inside serving (issue 5): LoRA training in the engine's own model, co-serving (FlexLLM),
activation reuse (Alchemist), durable feedback, replay mixing and live adapter versions."""
