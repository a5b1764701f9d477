"""Our own encoding of the onnx-tensorrt parser's support matrix, per TensorRT target.

Sources: onnx/onnx-tensorrt docs/operators.md (opset ranges, per-operator element types, "must be an
initializer/constant" restrictions) and NVIDIA/TensorRT CHANGELOG.md (ops the parser gained per 10.x
release). Each table is computed from a (major, minor) TensorRT version; JetPack targets use the
TensorRT their JetPack ships (JETPACK_TENSORRT, sourced and dated below). Operators are grouped by
the element types they accept; a graph op not in `supported` is reported as unsupported. Keep this
table small and explicit: when a TensorRT release changes a rule, add a Target field rather than
special-casing in the linter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FLOAT = frozenset({"float32", "float16", "bfloat16"})
INT = frozenset({"int32", "int64"})
BOOL = frozenset({"bool"})
NUM = FLOAT | INT
ANY = NUM | BOOL

# Element types TensorRT knows at all (quantized types only via Q/DQ); float64 is cast down with clamping.
KNOWN_TYPES = ANY | frozenset({"int8", "uint8", "int4", "float8e4m3fn", "float4e2m1"})
CAST_DOWN = frozenset({"float64"})

_FLOAT_OPS = """Acos Acosh Asin Asinh Atan Atanh Cos Cosh Sin Sinh Tan Tanh Ceil Floor Round Erf Exp Log Sqrt
Reciprocal Sigmoid Softmax LogSoftmax MatMul Gemm Conv ConvTranspose BatchNormalization InstanceNormalization
LayerNormalization GroupNormalization Elu Selu Celu HardSigmoid HardSwish LeakyRelu PRelu Softplus Softsign
ThresholdedRelu ParametricSoftplus ScaledTanh ImageScaler Clip CumSum Dropout Einsum LRN LpNormalization
MeanVarianceNormalization GlobalAveragePool GlobalMaxPool GlobalLpPool AveragePool MaxPool LpPool Resize IsInf
Hardmax GRU LSTM RNN Scan QuantizeLinear RandomUniform RandomUniformLike RandomNormal RandomNormalLike NonZero
NonMaxSuppression RoiAlign GridSample Upsample Gelu Mish DeformConv""".split()
_NUM_OPS = """Abs Add Sub Mul Div Neg Max Min Mean Sum Mod Sign Relu Greater GreaterOrEqual Less LessOrEqual
Equal ArgMax ArgMin Range Pad TopK IsNaN ScatterND ScatterElements Scatter DepthToSpace SpaceToDepth Shrink
ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare""".split()
_ANY_OPS = """Cast CastLike Concat Constant ConstantOfShape Expand Flatten Gather GatherElements GatherND Identity If
Loop Reshape Shape Size Slice Split Squeeze Unsqueeze Tile Transpose Trilu Where EyeLike OneHot
ReverseSequence""".split()
_BOOL_OPS = "And Or Xor Not".split()
_QDQ_OPS = ["DequantizeLinear"]  # input is the quantized type

# Ops the onnx-tensorrt parser rejects in every 10.x/11.x release we target.
NEVER = frozenset("""BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Compress ConcatFromSequence ConvInteger DFT
Det DynamicQuantizeLinear MatMulInteger MaxRoiPool MaxUnpool Multinomial NegativeLogLikelihoodLoss Optional
OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul SequenceAt SequenceConstruct SequenceEmpty
SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringNormalizer
TfIdfVectorizer Unique ImageDecoder RegexFullMatch AffineGrid Col2Im CenterCropPad MelWeightMatrix
Bernoulli""".split())

# Ops and operand types the parser gained within 10.x, from NVIDIA/TensorRT CHANGELOG.md ("Parser changes";
# read at the v11.1 tag, checked 2026-12-02): window ops 10.4, real STFT 10.5, integer-typed Pow base 10.12
# (integer exponents came in 10.8), Attention 10.14, RotaryEmbedding / RMSNormalization / TensorScatter 10.15.
_ADDED_FLOAT_OPS = {(10, 4): ["BlackmanWindow", "HammingWindow", "HannWindow"], (10, 5): ["STFT"],
                    (10, 14): ["Attention"], (10, 15): ["RotaryEmbedding", "RMSNormalization"]}
_ADDED_ANY_OPS = {(10, 15): ["TensorScatter"]}
_INT_POW = (10, 12)


def _table(version: tuple[int, int]) -> dict[str, frozenset[str]]:
    """The op -> element types table of the parser in TensorRT `version` (major, minor)."""
    t: dict[str, frozenset[str]] = {}
    t.update({op: FLOAT for op in _FLOAT_OPS})
    t.update({op: NUM for op in _NUM_OPS})
    t.update({op: ANY for op in _ANY_OPS})
    t.update({op: BOOL for op in _BOOL_OPS})
    t.update({op: frozenset({"int8", "float8e4m3fn", "int4", "float4e2m1"}) for op in _QDQ_OPS})
    t["Pow"] = NUM if version >= _INT_POW else FLOAT
    for since, ops in _ADDED_FLOAT_OPS.items():
        t.update({op: FLOAT for op in ops if version >= since})
    for since, ops in _ADDED_ANY_OPS.items():
        t.update({op: ANY for op in ops if version >= since})
    return t


def _opset_max(version: tuple[int, int]) -> int:
    """Newest ONNX opset the parser imports. 10.3: 20 (its operators.md). 10.6 moved the ONNX submodule to
    1.17.0 = opset 22 (CHANGELOG.md). onnx-tensorrt docs/operators.md states "opset 9 to opset 24" for 10.15
    and for 11.x; no source states 23/24 for 10.13/10.14, so they are held at 22 (conservative)."""
    if version >= (10, 15):
        return 24
    return 22 if version >= (10, 6) else 20


# (op, input index, input name): the parser needs these as initializers / Constant outputs.
_CONST_INPUTS_ALWAYS = (
    [("Slice", 3, "axes"), ("CumSum", 1, "axis"), ("Pad", 3, "axes"), ("OneHot", 1, "depth")]
    + [(op, 1, "axes") for op in _NUM_OPS if op.startswith("Reduce")]
)
_CONST_INPUTS_BEFORE_10_7 = [("Squeeze", 1, "axes"), ("Unsqueeze", 1, "axes")]  # dynamic axes added in 10.7

# Inputs TensorRT treats as shape tensors: a *graph input* reaching one needs set_shape_input values
# in every profile, which qwen2edge's profiles (and most users' runners) do not provide.
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4), "Resize": (3,), "Pad": (1,), "TopK": (1,), "OneHot": (1,), "Squeeze": (1,),
    "Unsqueeze": (1,), "Split": (1,), "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,), "ReduceMin": (1,),
}


@dataclass(frozen=True)
class Target:
    """One TensorRT release line as the linter sees it."""

    name: str
    label: str
    opset_min: int
    opset_max: int
    ops: dict[str, frozenset[str]]
    const_inputs: tuple[tuple[str, int, str], ...]
    strongly_typed_only: bool = False
    notes: tuple[str, ...] = field(default=())


def _target(name: str, label: str, version: tuple[int, int], strongly_typed_only: bool = False) -> Target:
    const = _CONST_INPUTS_ALWAYS + (_CONST_INPUTS_BEFORE_10_7 if version < (10, 7) else [])
    return Target(name, label, 9, _opset_max(version), _table(version), tuple(const), strongly_typed_only)


# What each JetPack ships (checked 2026-12-02):
# - JetPack 6.1/6.2 (Orin; Ubuntu 22.04, Python 3.10): TensorRT 10.3, CUDA 12.6 (NVIDIA JetPack 6.1 release
#   notes, as quoted by pytorch/TensorRT docs/getting_started/jetpack.rst, 2024-10; JetPack 6.2 is the same stack).
# - JetPack 7.0 (Jetson Linux 38.2) and 7.1 (38.4): Jetson Thor only (T5000/T4000); TensorRT 10.13, CUDA 13.0,
#   Ubuntu 24.04 (developer.nvidia.com/embedded/jetpack/downloads/archive-7.0 and archive-7.1; the CUDA 13.0 /
#   JetPack 7.0-7.1 row of TensorRT-Edge-LLM's support matrix, 0.10.1).
# - JetPack 7.2 (Jetson Linux 39.2): Orin and Thor; TensorRT 10.16, CUDA 13.2 (TensorRT-Edge-LLM support
#   matrix 0.10.1: Orin and Thor on JetPack 7.2 / CUDA 13.2; roboflow/inference PR 2478, 2026-06-18, read
#   TensorRT 10.16.2.10 off a JetPack 7.2 device).
# - TensorRT 11 on Jetson: only 11.4.1 and later, only on JetPack 7.2.2+ (AGX Orin, Thor); 11.0-11.3 do not
#   support JetPack ("Migrating TensorRT from 10.x to 11.x on Jetson/JetPack", TensorRT 11.4.1 and 11.3.0 docs).
JETPACK_TENSORRT = {"jetpack-6": (10, 3), "jetpack-7.0": (10, 13), "jetpack-7.2": (10, 16)}

TARGETS: dict[str, Target] = {
    "trt-10.3": _target("trt-10.3", "TensorRT 10.3", (10, 3)),
    "trt-10.13": _target("trt-10.13", "TensorRT 10.13", (10, 13)),
    "trt-10": _target("trt-10", "TensorRT 10.x, latest (10.16)", (10, 16)),
    "trt-11": _target("trt-11", "TensorRT 11.x (11.4)", (11, 4), strongly_typed_only=True),
    "jetpack-6": _target("jetpack-6", "JetPack 6.1/6.2 (Orin): TensorRT 10.3, CUDA 12.6",
                         JETPACK_TENSORRT["jetpack-6"]),
    "jetpack-7.0": _target("jetpack-7.0", "JetPack 7.0/7.1 (Thor): TensorRT 10.13, CUDA 13.0",
                           JETPACK_TENSORRT["jetpack-7.0"]),
    "jetpack-7.2": _target("jetpack-7.2", "JetPack 7.2 (Orin, Thor): TensorRT 10.16, CUDA 13.2",
                           JETPACK_TENSORRT["jetpack-7.2"]),
}
DEFAULT_TARGET = "trt-10.3"  # the oldest we support: a graph that passes here passes everywhere


def target_for_version(version: tuple[int, ...]) -> str:
    """The newest TensorRT-version target at or below an installed version (conservative in between)."""
    if version[0] >= 11:
        return "trt-11"
    if version[:2] >= (10, 16):
        return "trt-10"
    return "trt-10.13" if version[:2] >= (10, 13) else "trt-10.3"
