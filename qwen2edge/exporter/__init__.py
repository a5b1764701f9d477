"""ONNX export, graph checks, quantization and TensorRT engine builds (needs the `export` extra)."""
