"""Why the graph returns only the current tokens' keys/values (io_spec's cache design), measured.

Two ways to hand the KV cache back from a decode step, for a Qwen2-0.5B-shaped cache (24 layers,
2 KV heads, head_dim 64) on ONNX Runtime CPU:
  A. outputs present_key/value [B, Hkv, 1, D]; the host writes that row into its cache in place;
  B. outputs the updated cache [B, Hkv, L, D] (ScatterND of the new row into the past cache).
Only the cache traffic is in these graphs (no weights), so the table isolates the cost of the choice.
Prints a table: per-step milliseconds for each and the ratio B/A.
"""

from __future__ import annotations

import argparse
import sys
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper


def build(layers: int, hkv: int, seq: int, dim: int, updated_cache: bool) -> bytes:
    nodes, inputs, outputs = [], [], []
    cache_shape, row_shape = ["b", hkv, seq, dim], ["b", hkv, 1, dim]
    inputs.append(helper.make_tensor_value_info("idx", TensorProto.INT64, ["b", hkv, 1, 3]))
    for i in range(2 * layers):
        inputs.append(helper.make_tensor_value_info(f"past{i}", TensorProto.FLOAT, cache_shape))
        inputs.append(helper.make_tensor_value_info(f"new{i}", TensorProto.FLOAT, row_shape))
        # A trivial op on the new row stands in for the projection that produced it.
        nodes.append(helper.make_node("Relu", [f"new{i}"], [f"row{i}"]))
        if updated_cache:
            nodes.append(helper.make_node("ScatterND", [f"past{i}", "idx", f"row{i}"], [f"out{i}"]))
            outputs.append(helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, cache_shape))
        else:
            # Read the cache (as attention does) without copying it: reduce to a scalar.
            nodes.append(helper.make_node("ReduceMax", [f"past{i}"], [f"peek{i}"], keepdims=0))
            outputs.append(helper.make_tensor_value_info(f"row{i}", TensorProto.FLOAT, row_shape))
    g = helper.make_graph(nodes, "cache_io", inputs, outputs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def time_steps(updated: bool, layers: int, hkv: int, seq: int, dim: int, steps: int) -> float:
    sess = ort.InferenceSession(build(layers, hkv, seq, dim, updated), providers=["CPUExecutionProvider"])
    cache = {f"past{i}": np.zeros((1, hkv, seq, dim), np.float32) for i in range(2 * layers)}
    times = []
    for t in range(steps):
        pos = t % seq
        idx = np.array([[[[0, h, pos]] for h in range(hkv)]], dtype=np.int64)  # only used by B
        feed = {"idx": idx, **cache, **{f"new{i}": np.ones((1, hkv, 1, dim), np.float32) for i in range(2 * layers)}}
        t0 = time.perf_counter()
        outs = sess.run(None, feed)
        if updated:
            cache = {f"past{i}": outs[i] for i in range(2 * layers)}
        else:
            for i in range(2 * layers):
                cache[f"past{i}"][:, :, pos:pos + 1] = outs[i]
        times.append(time.perf_counter() - t0)
    return statistics.median(times[5:]) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--layers", type=int, default=24)
    args = ap.parse_args()
    print(f"{'max_seq_len':>11} {'A: present rows (ms)':>21} {'B: updated cache (ms)':>22} {'B/A':>6}")
    for seq in (512, 2048, 8192):
        print(f"measuring max_seq_len {seq} ...", file=sys.stderr, flush=True)
        a = time_steps(False, args.layers, 2, seq, 64, args.steps)
        b = time_steps(True, args.layers, 2, seq, 64, args.steps)
        print(f"{seq:>11} {a:>21.3f} {b:>22.3f} {b / a:>6.1f}")


if __name__ == "__main__":
    main()
