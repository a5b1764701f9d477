"""Serving a bundle on Triton Inference Server: `qwen2edge triton-repo` writes a model repository whose
model.py runs qwen2edge's generator in Triton's Python backend (guide: docs/triton.md)."""
