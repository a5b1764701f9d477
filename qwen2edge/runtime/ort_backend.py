"""ONNX Runtime backend (CPU by default; any provider ONNX Runtime offers)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InferenceError
from ..io_spec import IOSpec
from .backend import Backend


def default_threads() -> int:
    """Physical-core-sized intra-op pool: hyper-threads slow memory-bound decode down."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class OrtBackend(Backend):
    """Runs model.onnx with onnxruntime.InferenceSession."""

    name = "ort"
    thread_safe = True  # InferenceSession.run is documented thread-safe; each batch has its own cache

    def __init__(self, model_path: str | Path, spec: IOSpec, threads: int | None = None,
                 providers: list[str] | None = None, optimized_model_path: str | Path | None = None):
        super().__init__(spec)
        if spec.kv_dtype == "bfloat16" and not providers:
            raise InferenceError("ONNX Runtime's CPU provider has no bfloat16 MatMul, so bf16 bundles run on "
                                 "TensorRT only: use --backend trt, or export with --dtype fp16/fp32 for ONNX Runtime")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if optimized_model_path:
            opts.optimized_model_filepath = str(optimized_model_path)
        try:
            self.session = ort.InferenceSession(str(model_path), opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise InferenceError(f"ONNX Runtime could not load {model_path} ({str(exc).splitlines()[0]}): "
                                 "re-export the bundle with this qwen2edge version") from exc
        self._outputs = [o.name for o in self.session.get_outputs()]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(self._outputs, feed)
        except Exception as exc:
            raise InferenceError(f"ONNX Runtime failed to run the graph ({str(exc).splitlines()[0]})") from exc
        return dict(zip(self._outputs, values))
