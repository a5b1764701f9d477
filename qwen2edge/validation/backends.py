"""The runners a comparison drives: the bundle's backends as `generate` uses them, plus `ort-graph`,
ONNX Runtime executing the graph exactly as written.

Why `ort-graph`: for a quantized bundle ONNX Runtime fuses DequantizeLinear + MatMul into its
MatMulNBits kernel, which quantizes the activations to int8 (accuracy level 4). That kernel's error
depends on the model (on the default model it is as large as scaling one MLP weight by 5% is on a
tiny one), so it cannot tell a faithful export from a wrong one. With basic optimizations only, the
graph's own float arithmetic runs, which equals the quantized reference to float32 rounding: the
export is judged there, and the fast kernel against its own, looser, tolerance row.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InferenceError, InputError, Qwen2EdgeError
from ..runtime.backend import Backend
from ..runtime.bundle import BACKENDS, Bundle
from ..runtime.generator import Generator

GRAPH = "ort-graph"
KINDS = (*BACKENDS, GRAPH)
DESCRIPTIONS = {
    "ort": "ONNX Runtime CPU, as generate and serve run it",
    "trt": "TensorRT engine (untested on TensorRT)",
    GRAPH: "ONNX Runtime CPU, basic optimizations only: the graph's own arithmetic (no fused kernels)",
}


class GraphBackend(Backend):
    """ONNX Runtime with basic graph optimizations only (no DequantizeLinear+MatMul fusion)."""

    name = GRAPH

    def __init__(self, bundle: Bundle):
        import onnxruntime as ort

        from ..runtime.ort_backend import default_threads, session_options

        super().__init__(bundle.spec)
        opts = session_options(default_threads(), ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        # Without QDQ handling, constant folding runs each weight's DequantizeLinear once at load (the same
        # op on the same constants) instead of at every step: 5x faster steps on the default model.
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
        self.session = ort.InferenceSession(str(bundle.path / bundle.manifest.model_file), opts,
                                            providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._outputs = [o.name for o in self.session.get_outputs()]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, self.session.run(None, {n: feed[n] for n in self._inputs})))


def backends_for(requested: Sequence[str], quantized: bool) -> list[str]:
    """The runners to compare: the requested ones, and for a quantized bundle `ort-graph` first."""
    bad = [k for k in requested if k not in KINDS]
    if bad:
        raise InputError(f"unknown backend {bad[0]!r}: set {{opt:backend}} to one of {', '.join(KINDS)}")
    kinds = list(dict.fromkeys(requested)) or ["ort"]
    return list(dict.fromkeys([GRAPH, *kinds])) if quantized else kinds


def open_generator(bundle: Bundle, kind: str) -> Generator:
    """The bundle's generator on a runner of KIND, with a one-line error when its library (e.g. TensorRT)
    is absent."""
    return bundle.generator(open_backend(bundle, kind))


def open_backend(bundle: Bundle, kind: str) -> Backend:
    """A runner of KIND for BUNDLE, with a one-line error when its library (e.g. TensorRT) is absent."""
    try:
        if kind == GRAPH:
            if bundle.spec.kv_dtype == "bfloat16":
                raise InferenceError("ONNX Runtime's CPU provider cannot run bf16 graphs: compare a bf16 bundle "
                                     "with {opt:backend} trt")
            return GraphBackend(bundle)
        return bundle.backend(kind)
    except Qwen2EdgeError:
        raise
    except ImportError as exc:
        lib = "TensorRT" if kind == "trt" else "ONNX Runtime"
        raise InferenceError(f"{{opt:backend}} {kind} needs {lib}, which is not usable here ({exc}): install the "
                             f"`tensorrt` extra on an NVIDIA GPU machine, or drop {{opt:backend}} {kind}") from None
