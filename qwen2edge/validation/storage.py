"""The weights a quantized bundle holds, rebuilt from the checkpoint for the reference.

A weight-only int8/int4 bundle is a different model from its checkpoint: every quantized matrix is
replaced by its blockwise-dequantized grid. The reference therefore runs the checkpoint's weights
through the same recipe, written here from its definition in the manifest (`quantization`) and
docs/performance.md, not taken from the exporter, so an export that quantizes wrongly still shows:

  * int8 weights: symmetric, scale = max|w| / 127 per block, q = round-half-even(w / scale) in [-127, 127];
  * int4 weights: asymmetric, lo = min(min w, 0), hi = max(max w, 0), scale = (hi - lo) / 15,
    zero point = round(-lo / scale) in [0, 15], q = round(w / scale) + zero point in [0, 15];
    or (`int4.symmetric`) m = the block's signed largest-magnitude weight, scale = -m / 8 when m < 0
    else m / 7, q = round(w / scale) in [-8, 7]; the lm_head int8 when `int4.lm_head_int8`
    (the per-block scale search, `int4.scale_search`, is not rebuilt: a library-only option);
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
# Since issue #16 the int4 `weights` string names the scale rule, and `int4` records the choices.
INT4_WEIGHTS = {"uint4 asymmetric (zero point per block), min/max scale": False,
                "int4 symmetric (largest magnitude -> -8), min/max scale": True,
                KNOWN_RECIPES["int4"]: False}  # -> symmetric; the last: bundles from before #16
FORMAT = "DequantizeLinear(block_size)+MatMul"
EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
# The graph holds q/k/v as one matrix and gate/up as one (graphs/model.py): blocks run along the input
# axis, so the fused matrix's grid is its parts' grids, but the exporter counts it once.
FUSED_INTO_ANOTHER = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight")


@dataclass(frozen=True)
class WeightQuantization:
    """The weight quantization of one bundle (from its manifest)."""

    scheme: str
    block_size: int
    embeddings: bool
    quantized_tensors: int | None = None  # as the exporter counted them, to cross-check the rule
    int4_symmetric: bool = False
    lm_head_int8: bool = False  # an int4 bundle's lm_head in int8

    @classmethod
    def from_record(cls, q: QuantizationRecord | None) -> "WeightQuantization | None":
        """From a bundle manifest's `quantization`; BundleError for a recipe this module does not rebuild."""
        if q is None:
            return None
        weights, fmt = q.details.get("weights"), q.details.get("format")
        int4 = q.details.get("int4") or {}
        known = weights == KNOWN_RECIPES["int8"] if q.scheme == "int8" else weights in INT4_WEIGHTS
        if not known or fmt != FORMAT or q.scheme not in KNOWN_RECIPES or int4.get("scale_search"):
            raise BundleError(f"the bundle's quantization ({q.scheme}: {weights!r}, {fmt!r}) is not one this "
                              "qwen2edge can rebuild for its reference: validate it with the qwen2edge version that "
                              "exported it, or re-export the bundle")
        return cls(q.scheme, q.block_size, q.embeddings, q.details.get("quantized_tensors"),
                   q.scheme == "int4" and INT4_WEIGHTS[weights], bool(int4.get("lm_head_int8")))

    @property
    def weight_scheme(self) -> str:
        """int8 | int4 | int4sym: the grid of the layers' matrices."""
        return "int4sym" if self.scheme == "int4" and self.int4_symmetric else self.scheme

    def describe(self) -> str:
        table = ", embedding table int8" if self.embeddings else ", embeddings and lm_head float"
        recipe = "int4 symmetric" if self.weight_scheme == "int4sym" else KNOWN_RECIPES[self.scheme]
        head = ", lm_head int8" if self.embeddings and self.lm_head_int8 else ""
        return f"{recipe} {self.scheme} weights in blocks of {self.block_size}{head}{table}"

    def apply(self, tensors: Mapping[str, Any], tied: bool) -> dict[str, Any]:
        """The quantized-then-dequantized copies of the tensors this recipe changes (torch, float32),
        keyed by Hugging Face name; `lm_head.weight` is included for tied models when it is quantized."""
        out: dict[str, Any] = {}
        for name, w in tensors.items():
            if name in (EMBEDDING, LM_HEAD) or w.ndim != 2 or not name.endswith(".weight"):
                continue
            if ".mlp." in name or ".self_attn." in name:
                if w.shape[1] % self.block_size == 0:
                    out[name] = dequantized(w, self.weight_scheme, self.block_size)
        if self.embeddings:
            table = tensors[EMBEDDING]
            head = table if tied else tensors[LM_HEAD]
            if head.shape[1] % self.block_size == 0:
                out[LM_HEAD] = dequantized(head, "int8" if self.lm_head_int8 else self.weight_scheme, self.block_size)
                out[EMBEDDING] = dequantized(table, "int8", self.block_size)
        counted = sum(not name.endswith(FUSED_INTO_ANOTHER) for name in out)
        if self.quantized_tensors is not None and counted != self.quantized_tensors:
            raise BundleError(f"the bundle quantized {self.quantized_tensors} tensors, the recipe in its manifest "
                              f"gives {counted}: re-export the bundle, or report a qwen2edge bug if that persists")
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
    if scheme == "int4sym":
        m = torch.gather(wb, -1, wb.abs().argmax(dim=-1, keepdim=True))
        scale = torch.where(m < 0, -m / 8.0, m / 7.0)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return (torch.clamp(torch.round(wb / scale), -8, 7) * scale).reshape(n, k)
    lo = torch.clamp(wb.amin(dim=-1, keepdim=True), max=0.0)
    hi = torch.clamp(wb.amax(dim=-1, keepdim=True), min=0.0)
    scale = (hi - lo) / 15.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.clamp(torch.round(-lo / scale), 0, 15)
    q = torch.clamp(torch.round(wb / scale) + zp, 0, 15)
    return ((q - zp) * scale).reshape(n, k)
