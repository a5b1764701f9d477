"""OpenAI-compatible HTTP serving over the torch-free runtime (needs the `serve` extra)."""
