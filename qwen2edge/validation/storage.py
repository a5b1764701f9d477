"""The weights a quantized bundle holds, rebuilt from the checkpoint for the reference.

A weight-only int8/int4 bundle is a different model from its checkpoint: every quantized matrix is
replaced by its blockwise-dequantized grid. The reference therefore runs the checkpoint's weights
through the same recipe, written here from its definition in the manifest (`quantization`) and
docs/performance.md, not taken from the exporter, so an export that quantizes wrongly still shows:

  * int8 weights: symmetric, scale = max|w| / 127 per block, q = round-half-even(w / scale) in [-127, 127];
  * int4 weights: asymmetric, lo = min(min w, 0), hi = max(max w, 0), scale = (hi - lo) / 15,
    zero point = round(-lo / scale) in [0, 15], q = round(w / scale) + zero point in [0, 15];
  * blocks of `block_size` along each matrix's input axis; a matrix whose input size is no multiple
    of it stays float; the lm_head is quantized only with `embeddings`, and then the embedding
    table too, always int8, in blocks along the hidden axis (tied models then hold two grids).

Precision (fp16/bf16) is not rebuilt: it changes the arithmetic, not the model, and is judged by its
tolerance row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..bundle_manifest import QuantizationRecord
from ..errors import BundleError

# The recipes this module reproduces, as the manifest describes them (exporter/quantize.py).
KNOWN_RECIPES = {"int8": "int8 symmetric", "int4": "uint4 asymmetric (zero point per block)"}
FORMAT = "DequantizeLinear(block_size)+MatMul"
EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class WeightQuantization:
    """The weight quantization of one bundle (from its manifest)."""

    scheme: str
    block_size: int
    embeddings: bool
    quantized_tensors: int | None = None  # as the exporter counted them, to cross-check the rule

    @classmethod
    def from_record(cls, q: QuantizationRecord | None) -> "WeightQuantization | None":
        """From a bundle manifest's `quantization`; BundleError for a recipe this module does not rebuild."""
        if q is None:
            return None
        weights, fmt = q.details.get("weights"), q.details.get("format")
        if KNOWN_RECIPES.get(q.scheme) != weights or fmt != FORMAT:
            raise BundleError(f"the bundle's quantization ({q.scheme}: {weights!r}, {fmt!r}) is not one this "
                              "qwen2edge can rebuild for its reference: validate it with the qwen2edge version that "
                              "exported it, or re-export the bundle")
        return cls(q.scheme, q.block_size, q.embeddings, q.details.get("quantized_tensors"))

    def describe(self) -> str:
        table = ", embedding table int8" if self.embeddings else ", embeddings and lm_head float"
        return f"{KNOWN_RECIPES[self.scheme]} {self.scheme} weights in blocks of {self.block_size}{table}"

    def apply(self, tensors: Mapping[str, Any], tied: bool) -> dict[str, Any]:
        """The quantized-then-dequantized copies of the tensors this recipe changes (torch, float32),
        keyed by Hugging Face name; `lm_head.weight` is included for tied models when it is quantized."""
        out: dict[str, Any] = {}
        for name, w in tensors.items():
            if name in (EMBEDDING, LM_HEAD) or w.ndim != 2 or not name.endswith(".weight"):
                continue
            if ".mlp." in name or ".self_attn." in name:
                if w.shape[1] % self.block_size == 0:
                    out[name] = dequantized(w, self.scheme, self.block_size)
        if self.embeddings:
            table = tensors[EMBEDDING]
            head = table if tied else tensors[LM_HEAD]
            if head.shape[1] % self.block_size == 0:
                out[LM_HEAD] = dequantized(head, self.scheme, self.block_size)
                out[EMBEDDING] = dequantized(table, "int8", self.block_size)
        if self.quantized_tensors is not None and len(out) != self.quantized_tensors:
            raise BundleError(f"the bundle quantized {self.quantized_tensors} tensors, the recipe in its manifest "
                              f"gives {len(out)}: re-export the bundle, or report a qwen2edge bug if that persists")
        return out


def dequantized(w: Any, scheme: str, block: int) -> Any:
    """w [N, K] (torch) quantized in blocks of `block` along K and dequantized, float32."""
    import torch

    n, k = w.shape
    wb = w.to(torch.float32).reshape(n, k // block, block)
    if scheme == "int8":
        scale = wb.abs().amax(dim=-1, keepdim=True) / 127.0
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round(wb / scale), -127, 127)
        return (q * scale).reshape(n, k)
    lo = torch.clamp(wb.amin(dim=-1, keepdim=True), max=0.0)
    hi = torch.clamp(wb.amax(dim=-1, keepdim=True), min=0.0)
    scale = (hi - lo) / 15.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.clamp(torch.round(-lo / scale), 0, 15)
    q = torch.clamp(torch.round(wb / scale) + zp, 0, 15)
    return ((q - zp) * scale).reshape(n, k)
