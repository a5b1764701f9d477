"""Export-friendly Qwen2 graph in PyTorch (`model`); its numpy position tables live in `qwen2edge.positions`."""
