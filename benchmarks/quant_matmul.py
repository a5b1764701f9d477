"""Does ONNX Runtime run the portable quantized graph as fast as its own MatMulNBits op?

A chain of L [1, K] x [K, N] MatMuls (Qwen2-0.5B's up-projection shape) as: fp32; blockwise
DequantizeLinear (opset 21) int8 / uint4 + MatMul (what `qwen2edge export --quantize` writes);
and com.microsoft MatMulNBits int8 / int4 written directly (accuracy_level 4: int8 activations).
Prints ms per chain (median, engines interleaved), the ops ORT's optimizer left (MatMulNBits
means it fused the DequantizeLinear), and the error against fp32.

    python benchmarks/quant_matmul.py [--repeats 30] [--block 32]
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

K, N, L = 896, 4864, 8
rng = np.random.default_rng(0)
Ws = [rng.standard_normal((K, N)).astype(np.float32) * 0.02 for _ in range(L)]
def sess(model, name):
    o = ort.SessionOptions(); o.intra_op_num_threads = 2; o.log_severity_level=3
    o.optimized_model_filepath = f"{TMP}/{name.replace(' ', '_')}.onnx"
    s = ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(o.optimized_model_filepath).graph.node)
    return s, dict(ops)
def chain(make_w, opset, domain_ops=False):
    nodes, inits = [], []
    cur = "x"
    for i, W in enumerate(Ws):
        out = f"y{i}"
        n, ini = make_w(i, W, cur, out)
        nodes += n; inits += ini
        # reduce back to K with slice so chain continues
        nodes.append(helper.make_node("Slice", [out, "st", "en", "ax"], [f"sl{i}"]))
        cur = f"sl{i}"
    inits += [numpy_helper.from_array(np.array([0],np.int64),"st"), numpy_helper.from_array(np.array([K],np.int64),"en"), numpy_helper.from_array(np.array([-1],np.int64),"ax")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, K])],
                          [helper.make_tensor_value_info(cur, TensorProto.FLOAT, None)], inits)
    imps = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if domain_ops else [])
    return helper.make_model(g, opset_imports=imps)
def fp32(i, W, x, y):
    return [helper.make_node("MatMul", [x, f"w{i}"], [y])], [numpy_helper.from_array(W, f"w{i}")]
def qblock(W, bits, B):
    Wb = W.reshape(K // B, B, N)
    if bits == 8:
        s = np.abs(Wb).max(1) / 127; q = np.clip(np.round(Wb / s[:, None]), -127, 127).astype(np.int8); zp=None
    else:
        mn, mx = np.minimum(Wb.min(1), 0), np.maximum(Wb.max(1), 0)
        s = (mx - mn) / 15; zp = np.clip(np.round(-mn / s), 0, 15).astype(np.uint8)
        q = np.clip(np.round(Wb / s[:, None]) + zp[:, None], 0, 15).astype(np.uint8)
    return q.reshape(K, N), s.astype(np.float32), zp
def dq(bits, B):
    def f(i, W, x, y):
        q, s, zp = qblock(W, bits, B)
        if bits == 8:
            qt = numpy_helper.from_array(q, f"q{i}")
            ins = [f"q{i}", f"sc{i}"]; extra=[]
        else:
            qt = helper.make_tensor(f"q{i}", TensorProto.UINT4, q.shape, q.flatten().tolist())
            zt = helper.make_tensor(f"z{i}", TensorProto.UINT4, zp.shape, zp.flatten().tolist())
            ins = [f"q{i}", f"sc{i}", f"z{i}"]; extra=[zt]
        return ([helper.make_node("DequantizeLinear", ins, [f"w{i}"], axis=0, block_size=B),
                 helper.make_node("MatMul", [x, f"w{i}"], [y])], [qt, numpy_helper.from_array(s, f"sc{i}")] + extra)
    return f
def nbits(bits, B, acc):
    def f(i, W, x, y):
        q, s, zp = qblock(W, bits, B)   # q [K,N]
        qT = q.T.reshape(N, K // B, B)   # [N, nblocks, B]
        if bits == 4:
            packed = (qT[..., 0::2] | (qT[..., 1::2] << 4)).astype(np.uint8)   # low nibble first
            zT = zp.T  # [N, nblocks]
            if zT.shape[1] % 2: zT = np.concatenate([zT, np.zeros((N,1),np.uint8)],1)
            zpk = (zT[:, 0::2] | (zT[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
            extra = [numpy_helper.from_array(zpk, f"z{i}")]; ins = [x, f"q{i}", f"sc{i}", f"z{i}"]
        else:
            packed = (qT.astype(np.int16) + 128).astype(np.uint8)  # uint8 with zp 128
            extra = []; ins = [x, f"q{i}", f"sc{i}"]
        return ([helper.make_node("MatMulNBits", ins, [y], domain="com.microsoft", K=K, N=N, bits=bits, block_size=B, accuracy_level=acc)],
                [numpy_helper.from_array(packed, f"q{i}"), numpy_helper.from_array(s.T.copy().reshape(-1), f"sc{i}")] + extra)
    return f


TMP = tempfile.mkdtemp(prefix="quant_matmul-")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--block", type=int, default=32)
    args = ap.parse_args()
    b = args.block
    models = {"fp32 MatMul": chain(fp32, 21),
              f"DQ int8 b{b} + MatMul": chain(dq(8, b), 21), f"DQ uint4 b{b} + MatMul": chain(dq(4, b), 21),
              f"MatMulNBits 8-bit b{b}": chain(nbits(8, b, 4), 21, True),
              f"MatMulNBits 4-bit b{b}": chain(nbits(4, b, 4), 21, True)}
    sessions = {k: sess(m, k) for k, m in models.items()}
    x = rng.standard_normal((1, 1, K)).astype(np.float32)
    ref = sessions["fp32 MatMul"][0].run(None, {"x": x})[0]
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.repeats):
        for k, (s, _ops) in sessions.items():
            t = time.perf_counter()
            s.run(None, {"x": x})
            times[k].append(time.perf_counter() - t)
    print(f"{L} x MatMul [1,{K}] x [{K},{N}], ORT {ort.__version__}, 2 threads, median of {args.repeats}")
    for k, (s, ops) in sessions.items():
        err = np.abs(s.run(None, {"x": x})[0] - ref).max() / np.abs(ref).max()
        print(f"{k:<26}{np.median(times[k]) * 1e3:>9.2f} ms   rel err {err:.3f}   ops after optimization: {ops}")


if __name__ == "__main__":
    main()
