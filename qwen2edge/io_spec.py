"""Names, dtypes and shapes of the exported graph's inputs and outputs: defined here once.

Imported by the exporter (to name the ONNX I/O), the runtime (to build feeds) and the tests. Torch-free.

Cache design: the graph receives the cache `past_key.{i}` / `past_value.{i}`
[batch, kv_heads, past_len, head_dim] and returns only the keys/values of the *current* tokens
(`present_key.{i}` [batch, kv_heads, seq, head_dim]). The runtime writes those few rows into its
preallocated cache in place. Returning an updated cache instead would make every decode step write
(and on ONNX Runtime, allocate) the whole cache: measured in docs/design.md.

past_len (schema 2) is the cache's current capacity, up to max_seq_len: a step attends every slot
it is given, so the runtime hands over a cache sized to the sequence (grown in buckets) rather than
max_seq_len slots, and a long-context bundle decodes short sequences at short-sequence cost.
Schema 1 bundles have past_len fixed at max_seq_len and still run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import InternalError

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # 1: past_len fixed at max_seq_len

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"
LOGITS_INDEX = "logits_index"
LOGITS = "logits"

# Dual Chunk Attention inputs, computed on the host by runtime/dca_feed.py from positions/dca.py.
# position_ids keep the TRUE positions (causality among the current tokens); these carry the
# wrapped rotary indices and chunk ids.
DCA_POS_KEY = "dca_pos_key"  # [B, T] P_k = pos mod s: rotates the new keys AND the intra-chunk queries
DCA_POS_Q_SUCC = "dca_pos_q_succ"  # [B, T] query position against the previous chunk
DCA_POS_Q_INTER = "dca_pos_q_inter"  # [B, T] query position against chunks two or more back
DCA_Q_CHUNK = "dca_q_chunk"  # [B, T] floor(pos / s) of the current tokens
DCA_K_CHUNK = "dca_k_chunk"  # [B, L + T] chunk id of every cache slot, then of the current tokens
DCA_SCALE = "dca_scale"  # [B] float32 temperature sf: multiplies new keys (cached so) and the queries
DCA_INPUTS = (DCA_POS_KEY, DCA_POS_Q_SUCC, DCA_POS_Q_INTER, DCA_Q_CHUNK, DCA_K_CHUNK, DCA_SCALE)

# Symbolic dimension names used in the ONNX graph and TensorRT profiles.
BATCH = "batch"
SEQ = "seq"
N_LOGITS = "n_logits"
PAST_LEN = "past_len"  # cache slots handed to this step (<= max_seq_len)
TOTAL_SEQ = "total_seq"  # past_len + seq


_PAST, _PRESENT = "past_", "present_"


def past_key(i: int) -> str:
    return f"{_PAST}key.{i}"


def past_value(i: int) -> str:
    return f"{_PAST}value.{i}"


def present_key(i: int) -> str:
    return f"{_PRESENT}key.{i}"


def present_value(i: int) -> str:
    return f"{_PRESENT}value.{i}"


def is_cache_input(name: str) -> bool:
    """Whether `name` is a past_key.i / past_value.i input."""
    return name.startswith((_PAST + "key.", _PAST + "value."))


def present_name(past: str) -> str:
    """The output holding the current tokens' rows for cache input `past` (past_key.3 -> present_key.3)."""
    if not is_cache_input(past):
        raise InternalError(f"{past!r} is not a cache input: report this as a qwen2edge bug")
    return _PRESENT + past[len(_PAST):]


def hidden_state(i: int) -> str:
    """Debug output i, mirroring transformers' output_hidden_states[i]: 0 is the embedding output,
    i in 1..L-1 the residual stream after decoder layer i-1, L the last layer's output after the final norm."""
    return f"hidden_state.{i}"


# Export dtype (the --dtype flag) -> element type name used in the I/O spec and ONNX.
ONNX_ELEM = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Element type name -> numpy dtype (None: numpy has no bfloat16) and bytes per element.
NUMPY_DTYPES: dict[str, Any] = {"float32": np.float32, "float16": np.float16, "bfloat16": None, "int64": np.int64}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8}


def numpy_dtype(elem: str) -> Any:
    """numpy dtype of an element type name; raises for bfloat16, which numpy cannot hold."""
    dt = NUMPY_DTYPES.get(elem)
    if dt is None:
        raise TypeError(f"numpy has no {elem} dtype")
    return dt


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, element type and shape (ints or symbolic names)."""

    name: str
    dtype: str  # "int64" | "float32" | "float16" | "bfloat16"
    shape: tuple[Any, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def concrete_shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """The shape with each symbolic dimension replaced from `dims` (total_seq defaults to
        past_len + seq). The exporter's trace inputs, ONNX Runtime's preallocated outputs and TensorRT's
        profiles all size tensors through here."""
        dims = dict(dims)
        if TOTAL_SEQ not in dims and PAST_LEN in dims and SEQ in dims:
            dims[TOTAL_SEQ] = dims[PAST_LEN] + dims[SEQ]
        out = []
        for d in self.shape:
            if isinstance(d, int):
                out.append(d)
            elif d in dims:
                out.append(int(dims[d]))
            else:
                raise KeyError(f"{self.name} has a symbolic dimension {d!r} with no value")
        return tuple(out)


@dataclass(frozen=True)
class IOSpec:
    """The full I/O contract of one exported graph."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    num_layers: int
    max_seq_len: int
    kv_dtype: str
    dca: bool
    hidden_states: bool = False  # debug export: also outputs hidden_state.0..num_layers

    @property
    def growable_cache(self) -> bool:
        """Whether the cache length is a graph dimension (schema 2) rather than fixed at max_seq_len."""
        return any(t.shape[2] == PAST_LEN for t in self.cache_inputs)

    @property
    def cache_inputs(self) -> tuple[TensorSpec, ...]:
        """past_key.i / past_value.i, in input order: [batch, kv_heads, past_len, head_dim] each."""
        return tuple(t for t in self.inputs if is_cache_input(t.name))

    @property
    def kv_numpy_dtype(self) -> Any:
        """numpy dtype of the cache (bf16 caches live on the device only)."""
        return NUMPY_DTYPES.get(self.kv_dtype) or np.float32

    def tensor(self, name: str) -> TensorSpec:
        """The input or output called `name`."""
        for t in (*self.inputs, *self.outputs):
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes for every symbolic dimension."""
        axes: dict[str, dict[int, str]] = {}
        for t in (*self.inputs, *self.outputs):
            dyn = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if dyn:
                axes[t.name] = dyn
        return axes

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "num_layers": self.num_layers,
            "max_seq_len": self.max_seq_len,
            "kv_dtype": self.kv_dtype,
            "dca": self.dca,
            "hidden_states": self.hidden_states,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IOSpec":
        def ts(x: dict[str, Any]) -> TensorSpec:
            return TensorSpec(x["name"], x["dtype"], tuple(x["shape"]))

        return cls(
            inputs=tuple(ts(x) for x in d["inputs"]),
            outputs=tuple(ts(x) for x in d["outputs"]),
            num_layers=int(d["num_layers"]),
            max_seq_len=int(d["max_seq_len"]),
            kv_dtype=d["kv_dtype"],
            dca=bool(d.get("dca", False)),
            hidden_states=bool(d.get("hidden_states", False)),
        )


def build_io_spec(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    vocab_size: int,
    max_seq_len: int,
    dtype: str = "fp32",
    dca: bool = False,
    hidden_states: bool = False,
    hidden_size: int | None = None,
) -> IOSpec:
    """The I/O contract for a model of this shape.

    attention_mask [batch, past_len + seq]: 1 where a past cache slot / current token is real.
    Causality among the current tokens comes from position_ids (key pos <= query pos).
    logits_index [batch, n_logits]: which current positions get logits (1 for generation, seq for validation).
    With `dca`, the DCA_INPUTS follow logits_index (before the cache), in that order.
    hidden_states (debug exports, needs hidden_size): adds hidden_state.0..num_layers [batch, seq, hidden] fp32
    for per-layer drift reports; the default graph is unchanged.
    """
    kv = ONNX_ELEM[dtype]
    cache = (BATCH, num_kv_heads, PAST_LEN, head_dim)
    inputs = [
        TensorSpec(INPUT_IDS, "int64", (BATCH, SEQ)),
        TensorSpec(POSITION_IDS, "int64", (BATCH, SEQ)),
        TensorSpec(ATTENTION_MASK, "int64", (BATCH, TOTAL_SEQ)),
        TensorSpec(LOGITS_INDEX, "int64", (BATCH, N_LOGITS)),
    ]
    if dca:
        inputs += [
            TensorSpec(DCA_POS_KEY, "int64", (BATCH, SEQ)),
            TensorSpec(DCA_POS_Q_SUCC, "int64", (BATCH, SEQ)),
            TensorSpec(DCA_POS_Q_INTER, "int64", (BATCH, SEQ)),
            TensorSpec(DCA_Q_CHUNK, "int64", (BATCH, SEQ)),
            TensorSpec(DCA_K_CHUNK, "int64", (BATCH, TOTAL_SEQ)),
            TensorSpec(DCA_SCALE, "float32", (BATCH,)),
        ]
    for i in range(num_layers):
        inputs.append(TensorSpec(past_key(i), kv, cache))
        inputs.append(TensorSpec(past_value(i), kv, cache))
    outputs = [TensorSpec(LOGITS, "float32", (BATCH, N_LOGITS, vocab_size))]
    for i in range(num_layers):
        outputs.append(TensorSpec(present_key(i), kv, (BATCH, num_kv_heads, SEQ, head_dim)))
        outputs.append(TensorSpec(present_value(i), kv, (BATCH, num_kv_heads, SEQ, head_dim)))
    if hidden_states:
        if hidden_size is None:
            raise InternalError("hidden_states outputs need hidden_size: report this as a qwen2edge bug")
        # The residual stream is fp32 in every export dtype, so these are fp32 too.
        outputs += [TensorSpec(hidden_state(i), "float32", (BATCH, SEQ, hidden_size)) for i in range(num_layers + 1)]
    return IOSpec(tuple(inputs), tuple(outputs), num_layers, max_seq_len, kv, dca, hidden_states)
