"""Our own encoding of the onnx-tensorrt parser's support matrix, per TensorRT target.

Source: onnx/onnx-tensorrt docs/operators.md and docs/Changelog.md of the 10.x/11.x releases
(opset ranges, per-operator element types, "must be an initializer/constant" restrictions, ops
added per release). Operators are grouped by the element types they accept; a graph op not in
`supported` is reported as unsupported. Keep this table small and explicit: when a TensorRT
release changes a rule, add a Target field rather than special-casing in the linter.
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

# Added in later 10.x releases (10.15 LLM ops; windows/STFT later in 10.x): not in 10.3.
_LATE_FLOAT_OPS = "RMSNormalization RotaryEmbedding Attention BlackmanWindow HammingWindow HannWindow STFT".split()
_LATE_ANY_OPS = ["TensorScatter"]


def _table(late: bool) -> dict[str, frozenset[str]]:
    t: dict[str, frozenset[str]] = {}
    t.update({op: FLOAT for op in _FLOAT_OPS})
    t.update({op: NUM for op in _NUM_OPS})
    t.update({op: ANY for op in _ANY_OPS})
    t.update({op: BOOL for op in _BOOL_OPS})
    t.update({op: frozenset({"int8", "float8e4m3fn", "int4", "float4e2m1"}) for op in _QDQ_OPS})
    t["Pow"] = NUM if late else FLOAT  # integer Pow arrived after 10.3
    if late:
        t.update({op: FLOAT for op in _LATE_FLOAT_OPS})
        t.update({op: ANY for op in _LATE_ANY_OPS})
    return t


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


TARGETS: dict[str, Target] = {
    "trt-10.3": Target(
        "trt-10.3", "TensorRT 10.3 (JetPack 6.1/6.2)", 9, 20, _table(late=False),
        tuple(_CONST_INPUTS_ALWAYS + _CONST_INPUTS_BEFORE_10_7)),
    "trt-10": Target(
        "trt-10", "TensorRT 10.x, latest (10.16; JetPack 7)", 9, 24, _table(late=True), tuple(_CONST_INPUTS_ALWAYS)),
    "trt-11": Target(
        "trt-11", "TensorRT 11.x (11.4)", 9, 24, _table(late=True), tuple(_CONST_INPUTS_ALWAYS),
        strongly_typed_only=True),
}
DEFAULT_TARGET = "trt-10.3"  # the oldest we support: a graph that passes here passes everywhere


def target_for_version(version: tuple[int, ...]) -> str:
    """The lint target matching an installed TensorRT version (conservative below 10.7)."""
    if version[0] >= 11:
        return "trt-11"
    return "trt-10.3" if version[:2] < (10, 7) else "trt-10"
