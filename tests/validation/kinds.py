"""Every kind of bundle the exporter makes, as export options on a tiny model, and the "broken" copy of a
checkpoint (one MLP weight scaled by 1.05). Shared by the tests and scripts/accuracy_table.py."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

BROKEN_WEIGHT, BROKEN_SCALE = "model.layers.0.mlp.down_proj.weight", 1.05

# kind -> (tiny model preset, export options). YaRN and DCA come from config.json ("config": the
# presets carry them) or from export flags on the plain model ("flags").
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("gqa", {}),
    "yarn-config": ("yarn", {}),
    "yarn-flags": ("gqa", dict(long_context=dict(rope_scaling="yarn", rope_factor=4.0,
                                                 original_max_position_embeddings=64))),
    "dca-config": ("dca", {}),
    "dca-flags": ("gqa", dict(long_context=dict(dca_chunk_size=16, dca_local_size=4,
                                                dca_original_max_position_embeddings=32))),
    "fp16": ("gqa", dict(dtype="fp16")),
    "int8": ("gqa", dict(quantize=("int8", 32, True))),
    "int4": ("gqa", dict(quantize=("int4", 32, True))),
}
# Kinds whose arithmetic is the plain graph's, only laid out differently.
LAYOUT_KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "debug": ("gqa", dict(debug_hidden_states=True)),  # hidden_state.{i} outputs
    "external": ("gqa", dict(external_data=True)),  # weights in model.onnx.data
}
# Long enough to pass where the long-context mode matters (YaRN's L0 = 64, DCA's period 12 and its
# temperature from L0 = 32); the tiny YaRN-from-config model's L0 (128) is beyond a 96-slot cache.
LONG_PROMPT = {"yarn-flags": 70, "dca-config": 40, "dca-flags": 40}


def scale_one_weight(src: Path, dst: Path, name: str = BROKEN_WEIGHT, scale: float = BROKEN_SCALE) -> Path:
    """A copy of checkpoint SRC with tensor NAME multiplied by SCALE."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    w = load_file(str(dst / "model.safetensors"))
    w[name] = w[name] * scale
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def export_kind(model_dir: Path, kind: str, out: Path, max_seq_len: int) -> Path:
    """Export MODEL_DIR as bundle KIND into OUT (no TensorRT lint: it is tested elsewhere)."""
    from qwen2edge.config import LongContextOverrides
    from qwen2edge.exporter import export as export_mod
    from qwen2edge.exporter.quantize import QuantizeOptions

    opts = dict({**KINDS, **LAYOUT_KINDS}[kind][1])
    if "quantize" in opts:
        opts["quantize"] = QuantizeOptions(*opts["quantize"])
    if "long_context" in opts:
        opts["long_context"] = LongContextOverrides(**opts["long_context"])
    limit = export_mod.PROTOBUF_LIMIT
    if opts.pop("external_data", False):
        export_mod.PROTOBUF_LIMIT = 1 << 20  # every tiny model is "too big" now
    try:
        export_mod.export_bundle(model_dir, out, export_mod.ExportOptions(max_seq_len=max_seq_len, trt_check=None, **opts))
    finally:
        export_mod.PROTOBUF_LIMIT = limit
    return out
