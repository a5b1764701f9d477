"""TensorRT engines: build plans, profiles, engine manifests and the ONNX compatibility lint.

Everything here except `builder._trt_build` is pure Python and tested on CPU; TensorRT itself is
imported lazily, in one place per side (builder.py for builds, runtime/trt_backend.py for inference).
"""
