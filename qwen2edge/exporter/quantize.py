"""Weight-only int8/int4 quantization of an exported graph (a post-export ONNX transform).

Representation: every float weight that feeds a MatMul becomes a constant blockwise
`DequantizeLinear` (opset 21, `block_size` attribute, blocks along the reduction axis K) feeding
the unchanged MatMul. That is plain ai.onnx, so one graph serves every runtime:
  * ONNX Runtime's CPU provider fuses DequantizeLinear+MatMul into its MatMulNBits kernel at
    session creation (int4 and int8, measured with ORT 1.32; see docs/performance.md), so the
    weights stay packed in memory and each decode step reads 0.5 or 1 byte per weight;
  * TensorRT parses blockwise DequantizeLinear for weight-only quantization (untested on TensorRT
    here: no GPU).
int8 is symmetric (int8, no zero point); int4 is asymmetric (uint4 + a uint4 zero point per
block), which keeps more of each block's range for the skewed blocks a 4-bit grid suffers from.

The embedding table (a Gather, one row read per token) is quantized to int8 blocks along the
hidden axis with plain Gather/Cast/Mul ops, in both modes: it saves memory and file size, not
bandwidth, and int8 keeps the input embeddings close to exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import InputError

SCHEMES = ("int8", "int4")
BLOCK_SIZES = (32, 64, 128)
QUANT_OPSET = 21  # DequantizeLinear's block_size attribute and the uint4 type arrived in opset 21
TRACE_OPSET = 20  # the TorchScript exporter's newest; 20 -> 21 only widened types (int4), no semantics
FLOAT_TYPES = (1, 10)  # TensorProto.FLOAT, FLOAT16

Progress = Callable[[str], None]


@dataclass(frozen=True)
class QuantizeOptions:
    """What `--quantize` asked for."""

    scheme: str = "int8"
    block_size: int = 32
    embeddings: bool = True  # the lm_head MatMul and the embedding table too

    def check(self) -> None:
        if self.scheme not in SCHEMES:
            raise InputError(f"unknown --quantize {self.scheme!r}: pass --quantize int8 or int4")
        if self.block_size not in BLOCK_SIZES:
            raise InputError(f"--block-size {self.block_size} is not supported: pass one of "
                             f"{', '.join(map(str, BLOCK_SIZES))}")

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "block_size": self.block_size, "embeddings": self.embeddings,
                "format": "DequantizeLinear(block_size)+MatMul", "opset": QUANT_OPSET,
                "weights": "int8 symmetric" if self.scheme == "int8" else "uint4 asymmetric (zero point per block)",
                "embedding_table": "int8 blockwise" if self.embeddings else "float"}


def quantize_blocks(w: np.ndarray, scheme: str, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize w [K, N] in blocks of `block` rows along K.

    Returns (q [K, N] int8 or uint8 holding 0..15, scale [K/block, N] in w's dtype, zero point
    [K/block, N] uint8 or None). Dequantized: (q - zp) * scale, the DequantizeLinear formula.
    """
    k, n = w.shape
    wb = w.astype(np.float32).reshape(k // block, block, n)
    if scheme == "int8":
        scale = np.abs(wb).max(axis=1) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(wb / scale[:, None]), -127, 127).astype(np.int8)
        zp = None
    else:
        lo, hi = np.minimum(wb.min(axis=1), 0.0), np.maximum(wb.max(axis=1), 0.0)
        scale = (hi - lo) / 15.0
        scale[scale == 0] = 1.0
        zp = np.clip(np.rint(-lo / scale), 0, 15).astype(np.uint8)
        q = np.clip(np.rint(wb / scale[:, None]) + zp[:, None], 0, 15).astype(np.uint8)
    return q.reshape(k, n), scale.astype(w.dtype), zp


def pack_uint4(values: np.ndarray) -> bytes:
    """ONNX's 4-bit raw layout: flattened row-major, element 2i in the low nibble of byte i."""
    flat = values.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def _tensor(name: str, array: np.ndarray, uint4: bool = False):
    from onnx import TensorProto, helper, numpy_helper

    if uint4:
        return helper.make_tensor(name, TensorProto.UINT4, array.shape, pack_uint4(array), raw=True)
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _matmul_weights(model) -> list[tuple[Any, int, Any]]:
    """(node, input index, initializer) for each MatMul whose B input is a 2-D float initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            t = inits[node.input[1]]
            if len(t.dims) == 2 and t.data_type in FLOAT_TYPES:
                found.append((node, 1, t))
    return found


def _embedding_gathers(model, vocab_size: int) -> list[tuple[Any, Any]]:
    """(node, initializer) for Gathers that index rows of the [vocab, hidden] float table (not, say,
    a rotary table gathered by position)."""
    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] in inits:
            t = inits[node.input[0]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if len(t.dims) == 2 and t.dims[0] == vocab_size and t.data_type in FLOAT_TYPES and axis == 0:
                found.append((node, t))
    return found


def _is_lm_head(t, vocab_size: int) -> bool:
    return vocab_size in tuple(t.dims)


def quantize_model(model, options: QuantizeOptions, vocab_size: int, progress: Progress = lambda s: None) -> dict[str, Any]:
    """Rewrite `model` (an onnx.ModelProto with weights loaded) in place; returns a summary for the manifest."""
    from onnx import helper, numpy_helper

    options.check()
    bsz = options.block_size
    graph = model.graph
    weights = _matmul_weights(model)
    if not options.embeddings:
        weights = [w for w in weights if not _is_lm_head(w[2], vocab_size)]
    gathers = _embedding_gathers(model, vocab_size) if options.embeddings else []
    replaced: set[str] = set()
    new_inits, new_nodes, before = [], {}, 0
    skipped = []
    total = len(weights) + len(gathers)
    for i, (node, idx, t) in enumerate(weights, 1):
        k, n = t.dims
        if k % bsz:
            skipped.append(t.name)
            progress(f"  kept {node.name or t.name} float: its reduction axis ({k}) is not a multiple of block {bsz}")
            continue
        w = numpy_helper.to_array(t)
        before += w.nbytes
        q, scale, zp = quantize_blocks(w, options.scheme, bsz)
        base = f"{node.name or t.name}.{options.scheme}"
        q_name, s_name, deq = f"{base}.q", f"{base}.scale", f"{base}.dq"
        inputs = [q_name, s_name]
        new_inits += [_tensor(q_name, q, uint4=options.scheme == "int4"), _tensor(s_name, scale)]
        if zp is not None:
            inputs.append(f"{base}.zp")
            new_inits.append(_tensor(f"{base}.zp", zp, uint4=True))
        new_nodes.setdefault(id(node), []).append(
            helper.make_node("DequantizeLinear", inputs, [deq], name=f"{base}/DequantizeLinear", axis=0, block_size=bsz))
        node.input[idx] = deq
        replaced.add(t.name)
        if i % 8 == 0 or i == len(weights):
            progress(f"  quantized {i}/{total} weight matrices ({options.scheme}, block {bsz})")
    for node, t in gathers:
        v, h = t.dims
        if h % bsz:
            skipped.append(t.name)
            continue
        table = numpy_helper.to_array(t)
        before += table.nbytes
        # Blocks run along the hidden axis of each row: quantize the transpose (K = hidden).
        q, scale, _ = quantize_blocks(table.T, "int8", bsz)
        base = f"{node.name or t.name}.int8"
        out = node.output[0]
        c = lambda name, arr: new_inits.append(numpy_helper.from_array(np.asarray(arr, np.int64), name))  # noqa: E731
        new_inits += [_tensor(f"{base}.q", q.T), _tensor(f"{base}.scale", scale.T)]
        c(f"{base}.blocks_shape", [0, 0, h // bsz, bsz])
        c(f"{base}.out_shape", [0, 0, h])
        c(f"{base}.last", [-1])
        ids = node.input[1]
        dtype = t.data_type
        new_nodes.setdefault(id(node), []).extend([
            helper.make_node("Gather", [f"{base}.q", ids], [f"{base}.rows_q"], axis=0),
            helper.make_node("Gather", [f"{base}.scale", ids], [f"{base}.rows_s"], axis=0),
            helper.make_node("Cast", [f"{base}.rows_q"], [f"{base}.rows_f"], to=dtype),
            helper.make_node("Reshape", [f"{base}.rows_f", f"{base}.blocks_shape"], [f"{base}.blocks"]),
            helper.make_node("Unsqueeze", [f"{base}.rows_s", f"{base}.last"], [f"{base}.rows_s1"]),
            helper.make_node("Mul", [f"{base}.blocks", f"{base}.rows_s1"], [f"{base}.deq"]),
            helper.make_node("Reshape", [f"{base}.deq", f"{base}.out_shape"], [out]),
        ])
        node.output[0] = f"{base}.unused"  # the original Gather is dropped below
        replaced.add(t.name)
        progress(f"  quantized the embedding table {list(t.dims)} (int8, block {bsz})")
    dropped_gathers = {id(n) for n, _ in gathers if n.output[0].endswith(".unused")}
    nodes = []
    for node in graph.node:
        nodes.extend(new_nodes.get(id(node), []) if id(node) in dropped_gathers else [*new_nodes.get(id(node), []), node])
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = max(imp.version, QUANT_OPSET)
    after = sum(_stored_bytes(t) for t in new_inits)
    return {**options.to_dict(), "quantized_tensors": len(replaced), "skipped_tensors": skipped,
            "float_bytes_replaced": int(before), "quantized_bytes": int(after)}


def _stored_bytes(t) -> int:
    return len(t.raw_data) if t.raw_data else 0
