"""Nodes per decode step: what a bundle's graph holds as exported and after ONNX Runtime's optimizer.

Every node of the optimized graph runs once per decode step (one graph serves prefill and decode),
so its node count is the per-step kernel count the host pays launch overhead for. Prints one row
per bundle: nodes as exported (Constant nodes excluded: they are folded at load), nodes after ONNX
Runtime's full optimization, weight MatMuls (MatMul / MatMulNBits with an initializer weight), and
the most frequent op types of the optimized graph.

    python benchmarks/graph_nodes.py BUNDLE [BUNDLE ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # qwen2edge from this checkout


def count(bundle_dir: Path, threads: int = 1) -> dict:
    """Node counts of one bundle's exported and ORT-optimized graphs."""
    import onnx
    import onnxruntime as ort

    from qwen2edge.bundle_manifest import BundleManifest

    manifest = BundleManifest.read(bundle_dir, verify=False)
    model_path = bundle_dir / manifest.model_file
    exported = onnx.load(str(model_path), load_external_data=False)
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        opts.intra_op_num_threads = threads
        ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(Path(tmp) / "opt.onnx"), load_external_data=False)
    inits = {t.name for t in optimized.graph.initializer}
    ops = collections.Counter(n.op_type for n in optimized.graph.node)
    weight_mm = sum(1 for n in optimized.graph.node
                    if n.op_type in ("MatMul", "MatMulNBits", "FusedMatMul", "Gemm") and len(n.input) > 1
                    and n.input[1] in inits)
    q = manifest.quantization
    return {"bundle": str(bundle_dir), "dtype": manifest.dtype, "quantization": q.scheme if q else None,
            "layers": manifest.model_config.num_hidden_layers,
            "exported_nodes": sum(1 for n in exported.graph.node if n.op_type != "Constant"),
            "optimized_nodes": len(optimized.graph.node), "weight_matmuls": weight_mm,
            "optimized_ops": dict(ops.most_common())}


def table(rows: list[dict]) -> str:
    head = f"{'bundle':<44}{'format':>8}{'layers':>7}{'exported':>10}{'optimized':>10}{'per layer':>10}{'weight MMs':>11}   top ops (optimized)"
    out = [head, "-" * len(head)]
    for r in rows:
        fmt = r["quantization"] or r["dtype"]
        top = ", ".join(f"{k} {v}" for k, v in list(r["optimized_ops"].items())[:6])
        out.append(f"{Path(r['bundle']).name[-44:]:<44}{fmt:>8}{r['layers']:>7}{r['exported_nodes']:>10}"
                   f"{r['optimized_nodes']:>10}{r['optimized_nodes'] / r['layers']:>10.1f}{r['weight_matmuls']:>11}   {top}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, default=None, help="Also write the counts here.")
    args = ap.parse_args(argv)
    rows = []
    for b in args.bundles:
        if not (b / "manifest.json").is_file():
            print(f"error: {b} is not a qwen2edge bundle (no manifest.json): pass an export's output directory",
                  file=sys.stderr)
            return 2
        print(f"optimizing {b} ...", file=sys.stderr, flush=True)
        rows.append(count(b))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
