"""Load-time engine checks and checked binding (qwen2edge.trt.engine_io), without TensorRT.

The point of each test is qwen2edge's own logic: that what a TensorRT engine reports about itself is
compared with the bundle, and that a failure TensorRT signals by a return value becomes a one-line
InferenceError. So the engine and context here are small stand-ins implementing only the documented
calls engine_io makes (names and return conventions from NVIDIA/TensorRT python/src/infer/pyCore.cpp).
Untested on TensorRT.
"""

from types import SimpleNamespace

import pytest

from qwen2edge import io_spec
from qwen2edge.errors import InferenceError
from qwen2edge.trt.engine_io import (bind_address, bind_input, check_engine_io, engine_max_batch, new_context,
                                     output_shape, set_profile)
from qwen2edge.trt.profiles import compute_profiles, resolve_limits

TRT = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT", NONE="NONE"))
TRT_NAME = {v: k for k, v in {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64",
                              "INT32": "int32"}.items()}


class Engine:
    """An engine as TensorRT would build it from `spec` with `profiles`; fields can be broken per test."""

    def __init__(self, spec, profiles):
        self.io = {t.name: ["INPUT", TRT_NAME[t.dtype]] for t in spec.inputs}
        self.io |= {t.name: ["OUTPUT", TRT_NAME[t.dtype]] for t in spec.outputs}
        self.shape_io: set[str] = set()
        self.profiles = [{n: [list(s) for s in mmo] for n, mmo in p.shapes.items()} for p in profiles]
        self.context = "context"

    num_io_tensors = property(lambda self: len(self.io))
    num_optimization_profiles = property(lambda self: len(self.profiles))

    def get_tensor_name(self, i):
        return list(self.io)[i]

    def get_tensor_mode(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return SimpleNamespace(name=self.io[name][1])  # pybind11 enums expose .name

    def is_shape_inference_io(self, name):
        return name in self.shape_io

    def get_tensor_profile_shape(self, name, index):
        return self.profiles[index][name]

    def create_execution_context(self):
        return self.context


@pytest.fixture
def built():
    spec = io_spec.build_io_spec(2, 2, 8, 50, 64, "fp16")
    profiles = compute_profiles(spec, resolve_limits(spec, max_batch=3, max_input_len=16))
    return spec, profiles, Engine(spec, profiles)


def refused(fn, *needles):
    with pytest.raises(InferenceError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_a_matching_engine_passes_and_buffers_take_its_dtypes(built):
    spec, profiles, engine = built
    dtypes = check_engine_io(engine, TRT, spec, profiles, "model")
    assert dtypes == {t.name: t.dtype for t in (*spec.inputs, *spec.outputs)}
    assert dtypes["past_key.0"] == "float16" and dtypes[io_spec.LOGITS] == "float32"
    assert engine_max_batch(profiles) == 3


def test_a_missing_or_extra_tensor_is_refused(built):
    spec, profiles, engine = built
    del engine.io["past_value.1"]
    refused(lambda: check_engine_io(engine, TRT, spec, profiles, "model"), "lacks 'past_value.1'",
            "qwen2edge build-engine model")
    engine = Engine(spec, profiles)
    engine.io["extra_out"] = ["OUTPUT", "FLOAT"]
    refused(lambda: check_engine_io(engine, TRT, spec, profiles, "model"), "has 'extra_out'")


@pytest.mark.parametrize("name, change, needle", [
    ("past_key.0", (1, "FLOAT"), "past_key.0 as input float32, the bundle as input float16"),
    (io_spec.INPUT_IDS, (1, "INT32"), "as input int32, the bundle as input int64"),
    (io_spec.LOGITS, (0, "INPUT"), "logits as input float32, the bundle as output float32"),
])
def test_a_dtype_or_direction_mismatch_is_refused(built, name, change, needle):
    spec, profiles, engine = built
    engine.io[name][change[0]] = change[1]
    refused(lambda: check_engine_io(engine, TRT, spec, profiles, "model"), needle)


def test_shape_tensor_io_is_refused(built):
    spec, profiles, engine = built
    engine.shape_io.add(io_spec.ATTENTION_MASK)
    refused(lambda: check_engine_io(engine, TRT, spec, profiles, "model"), "as a shape tensor", "qwen2edge check")


def test_profiles_that_differ_from_the_manifest_are_refused(built):
    spec, profiles, engine = built
    engine.profiles = engine.profiles[:1]
    refused(lambda: check_engine_io(engine, TRT, spec, profiles, "model"), "1 optimization profiles",
            "manifest.json 2")
    engine = Engine(spec, profiles)
    engine.profiles[1][io_spec.INPUT_IDS][2] = [8, 1]  # decode max batch 8, the manifest says 3
    refused(lambda: check_engine_io(engine, TRT, spec, profiles, "model"), "profile 1 (decode) input_ids",
            "[[1, 1], [3, 1], [8, 1]]", "[[1, 1], [3, 1], [3, 1]]")


class Context:
    """An execution context whose calls return what a test tells them to."""

    def __init__(self, shape_ok=True, address_ok=True, out_shape=(1, 1, 50), profile=True):
        self.shape_ok, self.address_ok, self.out_shape, self.profile = shape_ok, address_ok, out_shape, profile
        self.bound = {}

    def set_input_shape(self, name, shape):
        return self.shape_ok

    def set_tensor_address(self, name, ptr):
        self.bound[name] = ptr
        return self.address_ok

    def get_tensor_shape(self, name):
        return self.out_shape

    def set_optimization_profile_async(self, index, stream):
        if self.profile == "raise":
            raise RuntimeError("Error in set optimization profile async.")
        return self.profile


def test_false_returns_become_one_line_errors():
    ok = Context()
    bind_input(ok, io_spec.INPUT_IDS, (1, 5), 0x1000)
    assert ok.bound == {io_spec.INPUT_IDS: 0x1000}
    refused(lambda: bind_input(Context(shape_ok=False), io_spec.INPUT_IDS, (9, 5), 0x1000),
            "refused shape (9, 5) for input input_ids", "--max-batch")
    refused(lambda: bind_input(Context(address_ok=False), io_spec.INPUT_IDS, (1, 5), 0x1000),
            "refused device address 0x1000 for input_ids")
    refused(lambda: bind_address(Context(), io_spec.LOGITS, 0), "address 0x0")  # a 0-byte buffer's null pointer
    refused(lambda: set_profile(Context(profile=False), 1, 0), "optimization profile 1")
    refused(lambda: set_profile(Context(profile="raise"), 1, 0), "optimization profile 1",
            "Error in set optimization profile async.")
    set_profile(Context(), 0, 0)


def test_uninferred_output_dimensions_and_missing_contexts_are_refused(built):
    assert output_shape(Context(out_shape=[2, 1, 50]), io_spec.LOGITS) == (2, 1, 50)
    refused(lambda: output_shape(Context(out_shape=(2, -1, 50)), io_spec.LOGITS), "shape of output logits",
            "(2, -1, 50)")
    engine = built[2]
    assert new_context(engine, "model") == "context"
    engine.context = None
    refused(lambda: new_context(engine, "model"), "could not create an execution context", "--max-batch")
