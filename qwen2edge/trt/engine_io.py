"""What a deserialized engine must look like before the runtime binds anything to it, and checked binding.

The bundle's I/O spec says what the ONNX had; the engine says what TensorRT built. They are compared
once at load (names, directions, element types, shape-tensor I/O, every profile's min/opt/max) and a
mismatch is refused in one line. Every TensorRT call that reports failure by a return value is checked.
The calls are the documented ICudaEngine / IExecutionContext Python API (10.3 through 11.1:
NVIDIA/TensorRT python/src/infer/pyCore.cpp at tags v10.3.0 and v11.1, read 2026-12-02): set_input_shape
and set_tensor_address return bool, create_execution_context may return None, get_tensor_shape reports a
dimension it cannot infer as -1, set_optimization_profile_async raises RuntimeError on failure.

Pure Python over duck-typed engine/context objects, so the refusals are tested on CPU; untested on TensorRT.
"""

from __future__ import annotations

from typing import Any, Sequence

from .. import io_spec
from ..errors import InferenceError
from ..io_spec import IOSpec
from .profiles import Profile

# tensorrt.DataType member name -> the I/O spec's dtype names (members by name: values differ across versions).
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
              "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def _dtype_name(dt: Any) -> str:
    name = getattr(dt, "name", str(dt)).rsplit(".", 1)[-1]
    return TRT_DTYPES.get(name, name.lower())


def _dims(dims: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in dims)


def check_engine_io(engine: Any, trt: Any, spec: IOSpec, profiles: Sequence[Profile], where: str) -> dict[str, str]:
    """Refuse an engine whose I/O differs from the bundle's spec or from the profiles in its manifest;
    returns {tensor name: dtype} as the engine has them (buffers are allocated from these)."""
    fix = f"rebuild the engine on this device: qwen2edge build-engine {where}"
    want = {t.name: ("input", t.dtype) for t in spec.inputs} | {t.name: ("output", t.dtype) for t in spec.outputs}
    modes = {trt.TensorIOMode.INPUT: "input", trt.TensorIOMode.OUTPUT: "output"}
    got: dict[str, tuple[str, str]] = {}
    for i in range(int(engine.num_io_tensors)):
        name = engine.get_tensor_name(i)
        got[name] = (modes.get(engine.get_tensor_mode(name), "neither"), _dtype_name(engine.get_tensor_dtype(name)))
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the bundle does not"
        raise InferenceError(f"the engine in {where} {what} ({len(got)} I/O tensors, the bundle has {len(want)}): "
                             f"{fix}")
    for name, (mode, dtype) in want.items():
        if got[name] != (mode, dtype):
            raise InferenceError(f"the engine in {where} has {name} as {got[name][0]} {got[name][1]}, the bundle as "
                                 f"{mode} {dtype}: {fix}")
        if engine.is_shape_inference_io(name):
            raise InferenceError(f"the engine in {where} treats {name} as a shape tensor, whose values qwen2edge "
                                 f"does not supply: run `qwen2edge check {where}` and re-export")
    if int(engine.num_optimization_profiles) != len(profiles):
        raise InferenceError(f"the engine in {where} has {engine.num_optimization_profiles} optimization profiles, "
                             f"its manifest.json {len(profiles)}: {fix}")
    for index, profile in enumerate(profiles):
        for name, expected in profile.shapes.items():
            actual = [list(_dims(d)) for d in engine.get_tensor_profile_shape(name, index)]
            manifest = [list(d) for d in expected]
            if actual != manifest:
                raise InferenceError(f"the engine in {where} has profile {index} ({profile.name}) {name} "
                                     f"min/opt/max {actual}, its manifest.json {manifest}: {fix}")
    return {name: dtype for name, (_, dtype) in got.items()}


def engine_max_batch(profiles: Sequence[Profile]) -> int:
    """The largest batch every profile accepts (a generation runs prefill and decode at one batch size)."""
    return min(p.shapes[io_spec.INPUT_IDS][2][0] for p in profiles)


def new_context(engine: Any, where: str) -> Any:
    context = engine.create_execution_context()
    if context is None:
        raise InferenceError(f"TensorRT could not create an execution context for the engine in {where} (usually out "
                             "of device memory): stop other GPU processes, or rebuild with a smaller --max-batch / "
                             "--max-input-len")
    return context


def set_profile(context: Any, index: int, stream_ptr: int) -> None:
    try:
        ok = context.set_optimization_profile_async(index, stream_ptr)
    except RuntimeError as exc:
        ok, detail = False, f" ({exc})"
    else:
        detail = ""
    if ok is False:
        raise InferenceError(f"TensorRT could not switch to optimization profile {index}{detail}: rebuild the engine, "
                             "and report it if that does not help")


def bind_input(context: Any, name: str, shape: Sequence[int], ptr: int) -> None:
    if not context.set_input_shape(name, tuple(int(d) for d in shape)):
        raise InferenceError(f"TensorRT refused shape {tuple(shape)} for input {name} (outside the engine's profile): "
                             "rebuild with larger --max-batch / --max-input-len / --max-logits")
    bind_address(context, name, ptr)


def bind_address(context: Any, name: str, ptr: int) -> None:
    if not ptr or not context.set_tensor_address(name, ptr):
        raise InferenceError(f"TensorRT refused device address {ptr:#x} for {name}: report this as a bug")


def output_shape(context: Any, name: str) -> tuple[int, ...]:
    """The output's shape for the bound inputs; refuses a dimension TensorRT could not infer (-1)."""
    shape = _dims(context.get_tensor_shape(name))
    if any(d < 0 for d in shape):
        raise InferenceError(f"TensorRT could not infer the shape of output {name} ({shape}) from the bound inputs: "
                             "report this as a bug with the prompt length and batch size")
    return shape
