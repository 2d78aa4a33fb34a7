"""Model implementations (one Llama-family forward covers Llama 2/3, Mistral, Qwen2 and SmolLM2 shapes)."""
