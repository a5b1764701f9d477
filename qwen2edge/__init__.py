"""qwen2edge: Qwen2 checkpoints to ONNX / TensorRT with a torch-free generation runtime."""

__version__ = "0.1.0"
