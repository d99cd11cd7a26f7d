"""Gateway: the public HTTP face (OpenAI-compatible chat, models, health, metrics)."""
