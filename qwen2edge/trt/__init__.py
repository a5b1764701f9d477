"""TensorRT engines: build plans, profiles, engine manifests and the ONNX compatibility lint.

Everything here except `builder._trt_build` is pure Python and tested on CPU; TensorRT itself is
imported lazily through tensorrt_env.import_tensorrt (builds and runtime/trt_backend.py alike).
"""
