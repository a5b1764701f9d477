"""int4 weight quantization choices measured on the default model (SmolLM2-135M-Instruct as Qwen2).

Each variant quantizes every linear weight of the transformers model with exporter/quantize.py's own
`quantize_blocks` and puts the dequantized weights back (exactly what the bundle's
DequantizeLinear computes; the embedding table is int8 in every row, as the exporter does), then
scores the built-in EN/ZH/code/math sequences against the fp32 model (benchmarks/quant_eval.py):
perplexity, top-1 agreement, mean KL. Bytes per token: the weights one decode step reads, for this
model and for Qwen2-0.5B's shape (fp32 scales, uint4 zero points when asymmetric).

Variants: block size, symmetric (int4, largest magnitude -> -8, llama.cpp Q4_0's grid) vs
asymmetric (uint4 + zero point), a per-block search for the scale with the least squared error
(optionally weighted by each input channel's mean squared activation on calibration texts), AWQ-style
activation-aware scaling (per input channel s = mean|x|^a, a searched per matrix group, folded
into the preceding RMSNorm / up_proj), and int8 for the lm_head.

    python benchmarks/int4_experiments.py [--variants all|quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import quant_eval  # noqa: E402

QWEN2_05B_CFG = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, head_dim=64, vocab_size=151936)


@dataclass(frozen=True)
class Variant:
    name: str
    block: int = 32
    symmetric: bool = True
    search: bool = False
    weighted: bool = False  # search error weighted by mean squared activation per input channel
    awq: bool = False
    lm_head_int8: bool = False

    def bytes_per_weight(self) -> float:
        return 0.5 + 4 / self.block + (0 if self.symmetric else 0.5 / self.block)


VARIANTS = (  # variants that differ only in the lm_head follow their base: its layers are reused
    Variant("asym b32 min/max (before)", 32, symmetric=False),
    Variant("asym b32 min/max, lm_head int8", 32, symmetric=False, lm_head_int8=True),
    Variant("sym b32 max", 32),
    Variant("asym b32 search", 32, symmetric=False, search=True),
    Variant("sym b32 search", 32, search=True),
    Variant("sym b32 search, lm_head int8", 32, search=True, lm_head_int8=True),
    Variant("sym b64 max", 64),
    Variant("sym b32 search act-weighted", 32, search=True, weighted=True),
    Variant("sym b32 search + AWQ", 32, search=True, awq=True),
)
QUICK = ("asym b32 min/max (before)", "sym b32 search")
AWQ_ALPHAS = (0.0, 0.5)  # a per group; 0 is no scaling (kept short: the machine is shared)


def capture_activations(model, seqs: list[list[int]]) -> dict[str, np.ndarray]:
    """Inputs of every nn.Linear over the calibration sequences: name -> X [rows, in_features]."""
    import torch

    rows: dict[str, list[np.ndarray]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, inp, name=name: rows.setdefault(name, []).append(inp[0][0].detach().float().numpy())))
    with torch.no_grad():
        for ids in seqs:
            model(torch.tensor([ids]), use_cache=False)
    for h in hooks:
        h.remove()
    return {k: np.concatenate(v) for k, v in rows.items()}


def _fake(w_kn: np.ndarray, v: Variant, bits: str, importance: np.ndarray | None) -> np.ndarray:
    from qwen2edge.exporter.quantize import dequantize_blocks, quantize_blocks

    q, s, zp = quantize_blocks(w_kn, bits, v.block, symmetric=v.symmetric, search=v.search and bits == "int4",
                               importance=importance)
    return dequantize_blocks(q, s, zp, v.block)


def quantize_group(ws: list[np.ndarray], x: np.ndarray | None, v: Variant) -> list[np.ndarray]:
    """Fake-quantize weights [N_i, K] that share the input x [rows, K] (a fused group)."""
    w_kn = np.concatenate([w.T for w in ws], axis=1)  # [K, sum N]: the fused matrix the graph holds
    imp = (x.astype(np.float64) ** 2).mean(0) if v.weighted else None
    if not v.awq:
        deq = _fake(w_kn, v, "int4", imp)
    else:
        mean_abs = np.abs(x).mean(0) + 1e-8
        ref = x @ w_kn
        best = None
        for a in AWQ_ALPHAS:
            s = mean_abs ** a
            s = s / np.sqrt(s.max() * s.min())  # centred around 1, as AWQ does
            d = _fake(w_kn * s[:, None], v, "int4", None if imp is None else imp / s**2) / s[:, None]
            err = float(((x @ d - ref) ** 2).sum())
            if best is None or err < best[0]:
                best = (err, d)
        deq = best[1]
    out, start = [], 0
    for w in ws:
        out.append(deq[:, start:start + w.shape[0]].T)
        start += w.shape[0]
    return out


_LAYERS_CACHE: dict = {}  # the last variant's dequantized layer weights, reused when only the lm_head differs


def apply_variant(model, original: dict, acts: dict[str, np.ndarray], v: Variant) -> None:
    """Put `v`'s dequantized weights into `model` (original: the fp32 state, name -> numpy)."""
    import torch

    from qwen2edge.exporter.quantize import dequantize_blocks, quantize_blocks

    def put(name: str, arr: np.ndarray) -> None:
        mod = model.get_submodule(name)
        mod.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)))

    key = replace(v, name="", lm_head_int8=False)
    if key not in _LAYERS_CACHE:
        _LAYERS_CACHE.clear()
        _LAYERS_CACHE[key] = _quantize_layers(model, original, acts, v)
    for name, arr in _LAYERS_CACHE[key].items():
        put(name, arr)
    table = original["model.embed_tokens.weight"]  # [V, C]: int8 blocks along C, as the exporter does
    q, s, _ = quantize_blocks(table.T, "int8", v.block)
    emb = dequantize_blocks(q, s, None, v.block).T
    model.model.embed_tokens.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(emb)))
    head_bits = "int8" if v.lm_head_int8 else "int4"
    head = _fake(table.T, v, head_bits, (acts["lm_head"].astype(np.float64) ** 2).mean(0) if v.weighted else None)
    model.lm_head.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(head.T)))


def _quantize_layers(model, original: dict, acts: dict[str, np.ndarray], v: Variant) -> dict[str, np.ndarray]:
    out = {}
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}."
        groups = [[p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"],
                  [p + "mlp.gate_proj", p + "mlp.up_proj"], [p + "self_attn.o_proj"], [p + "mlp.down_proj"]]
        for names in groups:
            # AWQ scales fold into the preceding RMSNorm (qkv, gate/up) or up_proj (down_proj); o_proj's
            # input is per query head while v is per KV head, so no exact fold exists there.
            vv = replace(v, awq=False) if "o_proj" in names[0] else v
            deqs = quantize_group([original[n + ".weight"] for n in names], acts.get(names[0]), vv)
            out.update(zip(names, deqs))
    return out


def run(variants: tuple[Variant, ...], continuation: int, log, model_dir: Path | None = None,
        on_row=lambda rows, info: None) -> tuple[list[dict], dict]:
    import torch

    from qwen2edge.exporter.gguf_convert import ensure_default_model
    from qwen2edge.validation.reference import HFReference

    model_dir = Path(model_dir or ensure_default_model(progress=log))
    ref = HFReference(model_dir)
    model = ref.model
    cfg = json.loads((model_dir / "config.json").read_text())
    seqs = quant_eval.eval_sequences(model_dir, ref, continuation)
    ref_logits = [ref.logits(ids) for _, ids in seqs]
    original = {k: t.detach().float().numpy().copy() for k, t in model.state_dict().items()}
    acts = capture_activations(model, quant_eval.calibration_sequences(model_dir))
    rows: list[dict] = []
    info = {"model": str(model_dir), "positions": 0, "ppl_ref": float("nan"),
            "fp32_mb_per_token": quant_eval.weight_mb_per_token(cfg, 4.0),
            "fp32_mb_per_token_05b": quant_eval.weight_mb_per_token(QWEN2_05B_CFG, 4.0)}
    for v in variants:
        t = time.perf_counter()
        apply_variant(model, original, acts, v)
        got = [ref.logits(ids) for _, ids in seqs]
        sc = quant_eval.score(ref_logits, got, seqs)
        head = 1 + 4 / v.block if v.lm_head_int8 else None
        rows.append({"variant": asdict(v), "score": asdict(sc),
                     "mb_per_token": quant_eval.weight_mb_per_token(cfg, v.bytes_per_weight(), head),
                     "mb_per_token_05b": quant_eval.weight_mb_per_token(QWEN2_05B_CFG, v.bytes_per_weight(), head)})
        info.update(positions=sc.positions, ppl_ref=sc.ppl_ref)
        log(f"{v.name}: ppl {sc.ppl:.3f} ({sc.ppl_delta:+.2%}), top-1 {sc.top1:.1%}, KL {sc.kl:.4f} "
            f"({time.perf_counter() - t:.0f}s)")
        on_row(rows, info)
    torch.set_grad_enabled(True)
    return rows, info


def table(rows: list[dict], info: dict) -> str:
    head = (f"{'variant':<38}{'ppl':>8}{'ppl delta':>10}{'top-1':>8}{'mean KL':>9}"
            f"{'MB/token':>10}{'0.5B MB/tok':>12}")
    out = [f"{Path(info['model']).name}, {info['positions']} scored positions, fp32 perplexity {info['ppl_ref']:.3f}; "
           f"fp32 reads {info['fp32_mb_per_token']:.0f} MB/token ({info['fp32_mb_per_token_05b']:.0f} for the 0.5B shape)",
           head, "-" * len(head)]
    for r in rows:
        s = r["score"]
        delta = s["ppl"] / s["ppl_ref"] - 1
        out.append(f"{r['variant']['name']:<38}{s['ppl']:>8.3f}{delta:>+10.2%}{s['top1']:>8.1%}{s['kl']:>9.4f}"
                   f"{r['mb_per_token']:>10.1f}{r['mb_per_token_05b']:>12.1f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="all", help="all, quick, or variant names separated by ';'")
    ap.add_argument("--continuation", type=int, default=32, help="Greedy tokens after each chat prompt.")
    ap.add_argument("--model-dir", type=Path, default=None, help="A Qwen2 checkpoint (default: the default model).")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    wanted = {"all": [v.name for v in VARIANTS], "quick": QUICK}.get(args.variants, args.variants.split(";"))
    variants = tuple(v for v in VARIANTS if v.name in wanted)
    if not variants:
        ap.error(f"--variants {args.variants!r} names none of: {', '.join(v.name for v in VARIANTS)}")
    def save(rows: list[dict], info: dict) -> None:  # after every variant: a long run keeps what it measured
        if args.json:
            args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=2))

    rows, info = run(variants, args.continuation, log, args.model_dir, save)
    print(table(rows, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
