"""fp32 decode speed of the default model: qwen2edge's ONNX Runtime generator vs transformers eager.

Both run greedy on the same chat prompt for the same number of new tokens, interleaved, in one
process; each figure is a median over --repeats runs. Prints a table with the ratio.
Needs the `export` extra (transformers is the peer). Usage:
    python benchmarks/default_model_decode.py [--bundle DIR] [--new-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # qwen2edge from this checkout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None, help="fp32 bundle of the default model (exported if absent)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch
    from transformers import Qwen2ForCausalLM

    from qwen2edge.demo import cached_bundle
    from qwen2edge.exporter.gguf_convert import default_model_dir, ensure_default_model
    from qwen2edge.runtime.bundle import Bundle
    from qwen2edge.runtime.sampling import SamplingParams

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    model_dir = ensure_default_model(progress=log)
    bundle_dir = args.bundle or cached_bundle(model_dir, default_model_dir().parent / "smollm2-135m-instruct-onnx-fp32", log)
    bundle = Bundle.open(bundle_dir)
    gen = bundle.generator()
    ids = bundle.tokenizer.encode(bundle.tokenizer.chat_prompt("Tell me a long story about a lighthouse keeper."))
    params = SamplingParams(max_new_tokens=args.new_tokens, stop_token_ids=(-1,))  # never stop early
    torch.set_num_threads(os.cpu_count() or 1)
    hf = Qwen2ForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    def run_ours() -> tuple[float, float]:
        _, t = gen.generate([ids], params)
        return t.prefill_s, t.decode_tokens_per_s

    def run_hf() -> tuple[float, float]:
        inp = torch.tensor([ids])
        with torch.no_grad():
            t0 = time.perf_counter()
            out = hf(inp, use_cache=True)
            ttft = time.perf_counter() - t0
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t1 = time.perf_counter()
            for _ in range(args.new_tokens - 1):
                out = hf(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return ttft, (args.new_tokens - 1) / (time.perf_counter() - t1)

    run_ours(), run_hf()  # warm-up
    ours, ref = [], []
    for i in range(args.repeats):
        log(f"run {i + 1}/{args.repeats}")
        ours.append(run_ours())
        ref.append(run_hf())
    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    load = os.getloadavg()[0]
    print(f"default model fp32, prompt {len(ids)} tokens, {args.new_tokens} new tokens greedy, "
          f"{os.cpu_count()} cores, load avg {load:.1f}, median of {args.repeats}")
    print(f"{'engine':<28} {'TTFT ms':>8} {'decode tok/s':>13} {'ratio':>6}")
    for name, xs in (("qwen2edge ONNX Runtime", ours), ("transformers eager", ref)):
        print(f"{name:<28} {med(xs, 0) * 1000:>8.1f} {med(xs, 1):>13.1f} {med(xs, 1) / med(ref, 1):>6.2f}")
    if load > (os.cpu_count() or 1) * 0.5:
        print("warning: the machine was busy during the run; figures are noisy", file=sys.stderr)


if __name__ == "__main__":
    main()
