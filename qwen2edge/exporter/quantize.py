"""Weight-only int8/int4 quantization of an exported graph (a post-export ONNX transform).

Representation: every float weight that feeds a MatMul becomes a constant blockwise
`DequantizeLinear` (opset 21, `block_size` attribute, blocks along the reduction axis K) feeding
the unchanged MatMul. That is plain ai.onnx, so one graph serves every runtime:
  * ONNX Runtime's CPU provider fuses DequantizeLinear+MatMul into its MatMulNBits kernel at
    session creation (int4 and int8, measured with ORT 1.32; see docs/performance.md), so the
    weights stay packed in memory and each decode step reads 0.5 or 1 byte per weight;
  * TensorRT parses blockwise DequantizeLinear for weight-only quantization (untested on TensorRT
    here: no GPU).
int8 is symmetric (int8, no zero point). int4 comes in two grids: asymmetric uint4 with a uint4 zero
point per block (the default: the best measured on the default model) or symmetric int4 without a
zero point (positive scales: the form TensorRT's parser takes). By default the lm_head MatMul of an
int4 bundle is int8. A per-block least-squares scale search (llama.cpp-style) is available to the
library (QuantizeOptions.int4_search) but measured worse, so the command line does not offer it. The
measurements: benchmarks/int4_experiments.py and docs/performance.md.

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
# The int4 default, chosen from measured perplexity / top-1 vs bytes per token on the default model
# (benchmarks/int4_experiments.py; the table and the reasoning are in docs/performance.md).
INT4_SYMMETRIC = False
INT4_SEARCH = False
INT4_LM_HEAD_INT8 = True
INT4_WEIGHTS = ("asymmetric", "symmetric")  # --int4-weights: int4_symmetric False / True
LM_HEAD_FORMATS = ("int8", "int4")  # --int4-lm-head: int4_lm_head_int8 True / False

Progress = Callable[[str], None]


@dataclass(frozen=True)
class QuantizeOptions:
    """What `--quantize` asked for. The int4 fields' defaults are the measured choice
    (benchmarks/int4_experiments.py, docs/performance.md)."""

    scheme: str = "int8"
    block_size: int = 32
    embeddings: bool = True  # the lm_head MatMul and the embedding table too
    int4_symmetric: bool = INT4_SYMMETRIC  # int4 without zero point (TensorRT's int4) vs uint4 + zero point
    int4_search: bool = INT4_SEARCH  # per-block least-squares scale search (llama.cpp-style)
    int4_lm_head_int8: bool = INT4_LM_HEAD_INT8  # int4 bundles keep the lm_head MatMul in int8

    @classmethod
    def from_flags(cls, scheme: str | None, block_size: int = 32, embeddings: bool = True,
                   int4_weights: str | None = None, int4_lm_head: str | None = None) -> "QuantizeOptions | None":
        """The export options as the command line gives them (None: not asked for); the int4 choices
        left unset take the measured defaults, and one given without int4 is refused."""
        given = [name for name, v in (("int4_weights", int4_weights), ("int4_lm_head", int4_lm_head)) if v is not None]
        if given and scheme != "int4":
            raise InputError(f"{{opt:{given[0]}}} applies to {{opt:quantize}} int4 only: drop it or pass "
                             "{opt:quantize} int4")
        if int4_lm_head is not None and not embeddings:
            raise InputError("{opt:int4_lm_head} needs {opt:quantize_embeddings} (without it the lm_head stays "
                             "float): drop one of them")
        if int4_weights is not None and int4_weights not in INT4_WEIGHTS:
            raise InputError(f"unknown {{opt:int4_weights}} {int4_weights!r}: pass {' or '.join(INT4_WEIGHTS)}")
        if int4_lm_head is not None and int4_lm_head not in LM_HEAD_FORMATS:
            raise InputError(f"unknown {{opt:int4_lm_head}} {int4_lm_head!r}: pass {' or '.join(LM_HEAD_FORMATS)}")
        if scheme is None:
            return None
        options = cls(scheme, block_size, embeddings,
                      int4_symmetric=INT4_SYMMETRIC if int4_weights is None else int4_weights == "symmetric",
                      int4_lm_head_int8=INT4_LM_HEAD_INT8 if int4_lm_head is None else int4_lm_head == "int8")
        options.check()
        return options

    def check(self) -> None:
        if self.scheme not in SCHEMES:
            raise InputError(f"unknown {{opt:quantize}} {self.scheme!r}: pass {{opt:quantize}} int8 or int4")
        if self.block_size not in BLOCK_SIZES:
            raise InputError(f"{{opt:block_size}} {self.block_size} is not supported: pass one of "
                             f"{', '.join(map(str, BLOCK_SIZES))}")

    def weight_format(self, lm_head: bool = False) -> str:
        """int8 | int4 | uint4: the element type one weight matrix gets."""
        if self.scheme == "int8" or (lm_head and self.int4_lm_head_int8):
            return "int8"
        return "int4" if self.int4_symmetric else "uint4"

    def to_dict(self) -> dict[str, Any]:
        if self.scheme == "int8":
            weights = "int8 symmetric"
        else:
            weights = ("int4 symmetric (largest magnitude -> -8)" if self.int4_symmetric
                       else "uint4 asymmetric (zero point per block)")
            weights += ", scale searched per block (least squares)" if self.int4_search else ", min/max scale"
        lm_head = "float" if not self.embeddings else self.weight_format(lm_head=True)
        return {"scheme": self.scheme, "block_size": self.block_size, "embeddings": self.embeddings,
                "format": "DequantizeLinear(block_size)+MatMul", "opset": QUANT_OPSET,
                "weights": weights, "lm_head": lm_head,
                "int4": {"symmetric": self.int4_symmetric, "scale_search": self.int4_search,
                         "lm_head_int8": self.int4_lm_head_int8} if self.scheme == "int4" else None,
                "embedding_table": "int8 blockwise" if self.embeddings else "float"}


def quantize_blocks(w: np.ndarray, scheme: str, block: int, symmetric: bool = True, search: bool = False,
                    importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize w [K, N] in blocks of `block` rows along K.

    Returns (q [K, N], scale [K/block, N] in w's dtype, zero point [K/block, N] uint8 or None).
    Dequantized: (q - zp) * scale, the DequantizeLinear formula. int8: symmetric, q in -127..127.
    int4 symmetric: q in -8..7 (int4, no zero point), scale > 0; the block's largest-magnitude weight
    maps exactly onto -8 or +7 (llama.cpp's Q4_0 uses -8 with a signed scale). int4 asymmetric: q in 0..15
    (uint4) with a uint4 zero point, the range [min(w, 0), max(w, 0)].
    search: per block, try candidate scales and keep the one with the least weighted squared error,
    each candidate's scale refit by least squares for its rounded values. As in llama.cpp's k-quants,
    each weight's error counts rms(block) + |w| times (plain squared error would clip the large
    weights that matter most), times `importance` [K] of its input channel when given (e.g. the
    mean squared activation).
    """
    k, n = w.shape
    wb = w.astype(np.float32).reshape(k // block, block, n)
    imp = None
    if search and scheme == "int4":
        imp = np.sqrt((wb * wb).mean(axis=1, keepdims=True)) + np.abs(wb)
        if importance is not None:
            imp = imp * np.asarray(importance, np.float32).reshape(k // block, block, 1)
    if scheme == "int8":
        scale = np.abs(wb).max(axis=1) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(wb / scale[:, None]), -127, 127).astype(np.int8)
        return q.reshape(k, n), scale.astype(w.dtype), None
    if symmetric:
        q, scale = _int4_symmetric(wb, search, imp)
        return q.reshape(k, n), scale.astype(w.dtype), None
    q, scale, zp = _int4_asymmetric(wb, search, imp)
    return q.reshape(k, n), scale.astype(w.dtype), zp


def _sq_err(wb: np.ndarray, deq: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
    d = (wb - deq) ** 2
    return (d if imp is None else d * imp).sum(axis=1)


def _lsq_scale(wb: np.ndarray, levels: np.ndarray, imp: np.ndarray | None, fallback: np.ndarray) -> np.ndarray:
    """Least-squares scale for fixed integer levels: sum(w x l) / sum(l^2) (weighted), per block."""
    wl = wb * levels if imp is None else wb * levels * imp
    ll = levels * levels if imp is None else levels * levels * imp
    num, den = wl.sum(axis=1), ll.sum(axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), fallback)


# Candidate scales per block (search=True): the plain scale times these factors (llama.cpp's
# make_qx_quants tries iscale = -(nmax + 0.1 i) / max for i in -9..9 likewise), plus their least-squares refit.
_SYM_FACTORS = tuple(8.0 / (8.0 + 0.1 * i) for i in range(-9, 10)) + (7.0 / 8.0, 8.0 / 7.0)
_ASYM_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8)


def _int4_symmetric(wb: np.ndarray, search: bool, imp: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    idx = np.abs(wb).argmax(axis=1)[:, None]
    m = np.take_along_axis(wb, idx, axis=1)[:, 0]  # signed largest-magnitude value per block column
    # Scales stay positive (TensorRT's ONNX parser wants positive quantization scales), so the
    # largest magnitude lands exactly on -8 when it is negative and on +7 when it is positive.
    base = np.where(m < 0, -m / 8.0, m / 7.0)
    base[base == 0] = 1.0
    if not search:
        return np.clip(np.rint(wb / base[:, None]), -8, 7).astype(np.int8), base
    best_err = best_scale = None
    for f in _SYM_FACTORS:
        lv = np.clip(np.rint(wb / (base * f)[:, None]), -8, 7)
        scale = _lsq_scale(wb, lv, imp, base * f)
        err = _sq_err(wb, lv * scale[:, None], imp)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err, best_scale = np.where(better, err, best_err), np.where(better, scale, best_scale)
    best_scale[best_scale <= 0] = 1.0  # an all-zero block (a refit never flips the sign of a good fit)
    return np.clip(np.rint(wb / best_scale[:, None]), -8, 7).astype(np.int8), best_scale


def _asym_levels(wb: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = (hi - lo) / 15.0
    scale[scale == 0] = 1.0
    zp = np.clip(np.rint(-lo / scale), 0, 15)
    q = np.clip(np.rint(wb / scale[:, None]) + zp[:, None], 0, 15)
    return q, scale, zp


def _int4_asymmetric(wb: np.ndarray, search: bool, imp: np.ndarray | None):
    lo, hi = np.minimum(wb.min(axis=1), 0.0), np.maximum(wb.max(axis=1), 0.0)
    if not search:
        q, scale, zp = _asym_levels(wb, lo, hi)
        return q.astype(np.uint8), scale, zp.astype(np.uint8)
    best = None
    for a in _ASYM_SHRINK:
        for b in _ASYM_SHRINK:
            q, scale, zp = _asym_levels(wb, lo * a, hi * b)
            lv = q - zp[:, None]
            scale = _lsq_scale(wb, lv, imp, scale)
            err = _sq_err(wb, lv * scale[:, None], imp)
            if best is None:
                best = [err, q, scale, zp]
            else:
                better = err < best[0]
                best = [np.where(better, err, best[0]), np.where(better[:, None], q, best[1]),
                        np.where(better, scale, best[2]), np.where(better, zp, best[3])]
    _, q, scale, zp = best
    scale[scale == 0] = 1.0
    return q.astype(np.uint8), scale, zp.astype(np.uint8)


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, block: int) -> np.ndarray:
    """(q - zp) * scale with scale / zero point repeated over each block's rows (DequantizeLinear)."""
    lv = q.astype(np.float32) - (0.0 if zp is None else np.repeat(zp.astype(np.float32), block, axis=0))
    return lv * np.repeat(scale.astype(np.float32), block, axis=0)


def pack_int4(values: np.ndarray) -> bytes:
    """ONNX's 4-bit raw layout: flattened row-major, element 2i in the low nibble of byte i (signed
    int4 as two's-complement nibbles; uint4 as is)."""
    flat = values.reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


pack_uint4 = pack_int4  # the same nibble layout for unsigned values


def _tensor(name: str, array: np.ndarray, nibbles: str | None = None):
    """An initializer; nibbles "int4" / "uint4" packs 4-bit values in ONNX's raw layout."""
    from onnx import TensorProto, helper, numpy_helper

    if nibbles:
        elem = TensorProto.INT4 if nibbles == "int4" else TensorProto.UINT4
        return helper.make_tensor(name, elem, array.shape, pack_int4(array), raw=True)
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
        fmt = options.weight_format(lm_head=_is_lm_head(t, vocab_size))
        bits = "int8" if fmt == "int8" else "int4"
        # Blocks run along K of each column, so a fused [K, N_q + N_k + N_v] matrix gets exactly
        # the blocks its parts would get on their own.
        q, scale, zp = quantize_blocks(w, bits, bsz, symmetric=fmt != "uint4", search=bits == "int4" and options.int4_search)
        base = f"{node.name or t.name}.{bits}"
        q_name, s_name, deq = f"{base}.q", f"{base}.scale", f"{base}.dq"
        inputs = [q_name, s_name]
        new_inits += [_tensor(q_name, q, nibbles=None if fmt == "int8" else fmt), _tensor(s_name, scale)]
        if zp is not None:
            inputs.append(f"{base}.zp")
            new_inits.append(_tensor(f"{base}.zp", zp, nibbles="uint4"))
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
