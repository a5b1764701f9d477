"""Export-friendly Qwen2 graph. `rope` and `dca` are numpy-only (the runtime imports them); `model` needs torch."""
