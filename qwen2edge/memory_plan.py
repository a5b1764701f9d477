"""`qwen2edge plan-memory`: will this bundle fit a Jetson's unified memory? (pure arithmetic, estimates)

On Jetson the CPU and GPU share one DRAM pool, so weights, KV cache, TensorRT's activation and
workspace memory, the CUDA/TensorRT libraries and the OS all come out of the same budget. Numbers
are estimates from the bundle's shapes; none has been measured on a Jetson.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .bundle_manifest import BundleManifest
from .trt.profiles import resolve_limits

GIB = 1024**3
MIB = 1024**2
_ITEM = {"float32": 4, "float16": 2, "bfloat16": 2}
RUNTIME_OVERHEAD = 1.2 * GIB  # CUDA context + cuBLAS/cuDNN/TensorRT libraries + Python: rule of thumb
OS_RESERVE = 1.5 * GIB  # headless JetPack with a margin
# Jetson Orin modules and their DRAM (GiB).
MODULES = {"Orin Nano 4GB": 4, "Orin Nano 8GB": 8, "Orin NX 8GB": 8, "Orin NX 16GB": 16, "AGX Orin 32GB": 32,
           "AGX Orin 64GB": 64, "AGX Thor 128GB": 128}


@dataclass(frozen=True)
class MemoryPlan:
    rows: list[tuple[str, float, str]]  # (item, bytes, how it was estimated)
    run_total: float
    build_peak: float

    def table(self) -> str:
        out = [f"{'item':<28} {'MiB':>9}  estimate", "-" * 78]
        out += [f"{name:<28} {b / MIB:>9.0f}  {how}" for name, b, how in self.rows]
        out += ["-" * 78, f"{'run total (incl. overhead)':<28} {self.run_total / MIB:>9.0f}",
                f"{'engine build peak':<28} {self.build_peak / MIB:>9.0f}  parser weights + builder copy + "
                "workspace + overhead", "",
                f"{'module':<16} {'DRAM':>5}  {'run':<4} build (after {OS_RESERVE / GIB:.1f} GiB OS reserve)"]
        for mod, gib in MODULES.items():
            avail = gib * GIB - OS_RESERVE
            run = "yes" if self.run_total <= avail else "NO"
            build = "yes" if self.build_peak <= avail else "swap" if self.build_peak <= avail + 8 * GIB else "NO"
            out.append(f"{mod:<16} {gib:>4}G  {run:<4} {build}")
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [{"item": n, "bytes": int(b), "estimate": h} for n, b, h in self.rows],
                "run_total_bytes": int(self.run_total), "build_peak_bytes": int(self.build_peak)}


def plan_memory(bundle_dir: str | Path, max_batch: int = 1, max_input_len: int | None = None,
                max_logits: int | None = None, workspace_mib: int | None = None) -> MemoryPlan:
    """Estimate device memory for running (and building) this bundle at these engine limits."""
    manifest = BundleManifest.read(bundle_dir, verify=False)
    spec, cfg = manifest.io_spec, manifest.model_config
    lim = resolve_limits(spec, max_batch, max_input_len, max_logits)
    kv_item = _ITEM.get(spec.kv_dtype)
    if kv_item is None:
        raise InputError(f"unknown cache dtype {spec.kv_dtype!r} in {bundle_dir}: re-export the bundle")
    weights = float(manifest.model_bytes)
    b, n, k, L = lim.max_batch, lim.max_input_len, lim.max_logits, spec.max_seq_len
    heads, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    kv = 2.0 * cfg.num_hidden_layers * b * kvh * L * d * kv_item
    # Per-layer live activations at the largest prefill (TensorRT reuses them across layers):
    # hidden + qkv + MLP intermediates in the model dtype, attention scores in fp32 (softmax island).
    act = b * n * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * kv_item + b * heads * n * (L + n) * 4.0 * 2
    logits = 2.0 * b * k * cfg.vocab_size * 4  # device output + host copy
    ws = float(workspace_mib * MIB) if workspace_mib else max(act, 256 * MIB)
    rows = [("weights (engine ~ ONNX)", weights, "size of model.onnx(+.data)"),
            ("KV cache", kv, f"2 x {cfg.num_hidden_layers} layers x {b} x {kvh} x {L} x {d} x {kv_item} B"),
            ("activations (prefill)", act, f"batch {b}, {n} tokens, scores vs {L}+{n} slots in fp32"),
            ("logits buffers", logits, f"{b} x {k} x {cfg.vocab_size} fp32, device + host"),
            ("builder workspace", ws, "--workspace" if workspace_mib else "estimate = activations (pass --workspace)"),
            ("CUDA/TensorRT/Python", RUNTIME_OVERHEAD, "rule of thumb, not measured")]
    run_total = weights + kv + act + logits + RUNTIME_OVERHEAD
    build_peak = 2.5 * weights + ws + RUNTIME_OVERHEAD
    return MemoryPlan(rows, run_total, build_peak)
