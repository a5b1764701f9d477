"""Speculative decoding on the default model: decode tok/s of plain greedy vs prompt lookup vs draft bundles.

Grounded prompts (repeat or edit a given passage, edit code, answer with quotes) and free chat, each run
once per method, methods interleaved per prompt, greedy, the chat template, every core the process may
use. decode tok/s = tokens after the first / decode time, summed over a category's prompts. Greedy
speculation must not change the output: the last column says whether every method produced plain's
tokens. No smaller SmolLM2 exists offline, so the drafts are built from the target: a random-weight
tiny Qwen2 with its tokenizer, and SmolLM2 cut to its first --draft-layers layers. Usage:
    python benchmarks/speculative_decode.py [--new-tokens 96] [--k 5] [--ngram 3] [--tiny]
"""

from __future__ import annotations

import argparse

from spec_common import default_bundle, draft_bundles, load_line, log, scratch, tiny_bundle

PASSAGE = ("The lighthouse stood on a rocky point at the edge of the bay. Every evening the keeper climbed the "
           "one hundred and twelve steps to light the lamp, and every morning he climbed them again to put it "
           "out. Ships passing in the night saw the beam sweep across the water once every ten seconds. In "
           "winter the storms were so strong that the windows rattled and the sea sprayed over the railing. "
           "The keeper kept a logbook in which he wrote the weather, the ships he saw, and the birds that "
           "rested on the gallery.")
CODE = ("def total_price(items, tax_rate):\n    total = 0\n    for item in items:\n        total += item.price * "
        "item.quantity\n    total = total * (1 + tax_rate)\n    return round(total, 2)\n")
GROUNDED = [
    f"Repeat the following passage exactly, word for word.\n\n{PASSAGE}",
    f"Rewrite the passage below, replacing every 'keeper' with 'guardian'. Change nothing else.\n\n{PASSAGE}",
    f"Rename the variable `total` to `amount` in this Python function. Reply with the full code only.\n\n{CODE}",
    f"Answer with exact quotes from the text: what did the keeper write in his logbook, and how often did "
    f"the beam sweep across the water?\n\n{PASSAGE}",
]
FREE = ["Tell me a short story about a dragon who learns to cook.",
        "What are some tips for staying productive when working from home?",
        "Explain how rainbows form."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=5, help="draft tokens per step (--num-speculative-tokens)")
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--draft-layers", type=int, default=8)
    ap.add_argument("--no-drafts", action="store_true", help="plain and prompt lookup only")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer random model (smoke run)")
    args = ap.parse_args()

    from qwen2edge.exporter.gguf_convert import default_model_dir
    from qwen2edge.runtime.bundle import Bundle
    from qwen2edge.runtime.sampling import SamplingParams
    from qwen2edge.runtime.speculative import SpeculativeConfig, speculator_factory

    work = scratch("qwen2edge-spec-") if args.tiny else default_model_dir().parent / "bench" / "spec-drafts"
    model_dir, bundle_dir = tiny_bundle(work) if args.tiny else default_bundle()
    drafts = {} if args.no_drafts else draft_bundles(model_dir, work, args.draft_layers)
    bundle = Bundle.open(bundle_dir)
    gen = bundle.generator()
    methods = {"plain": None,
               "prompt lookup": speculator_factory(SpeculativeConfig("prompt-lookup", args.k, args.ngram), bundle, gen)}
    for name, path in drafts.items():
        methods[f"draft: {name}"] = speculator_factory(SpeculativeConfig("draft", args.k, draft=str(path)), bundle, gen)
    params = SamplingParams(max_new_tokens=args.new_tokens)
    tok = bundle.tokenizer

    rows = []  # (category, method, decode tokens, decode s, drafted, accepted, same)
    for category, prompts in (("grounded", GROUNDED), ("free chat", FREE)):
        for i, text in enumerate(prompts):
            ids = tok.encode(tok.chat_prompt(text))
            ref = None
            for method, make in methods.items():
                log(f"{category} {i + 1}/{len(prompts)}: {method}")
                (res,), t = gen.generate([ids], params, speculator=make() if make else None)
                ref = ref or res.token_ids
                rows.append((category, method, t.decode_tokens, t.decode_s, res.drafted, res.accepted,
                             res.token_ids == ref))
    print(f"default model{' (tiny stand-in)' if args.tiny else ''} fp32, greedy, up to {args.new_tokens} new tokens, "
          f"K={args.k}, n-gram {args.ngram}, {load_line()}")
    print(f"{'prompts':<14} {'method':<24} {'decode tok/s':>12} {'vs plain':>8} {'accepted/drafted':>17} "
          f"{'acceptance':>10} {'same tokens':>11}")
    for category, prompts in (("grounded", GROUNDED), ("free chat", FREE)):
        base = None
        for method in methods:
            sel = [r for r in rows if r[0] == category and r[1] == method]
            tps = sum(r[2] for r in sel) / sum(r[3] for r in sel)
            base = base or tps
            drafted, accepted = sum(r[4] for r in sel), sum(r[5] for r in sel)
            rate = f"{accepted / drafted:.0%}" if drafted else "-"
            counts = f"{accepted}/{drafted}" if method != "plain" else "-"
            print(f"{category + f' ({len(prompts)})':<14} {method:<24} {tps:>12.2f} {tps / base:>8.2f} {counts:>17} "
                  f"{rate:>10} {'yes' if all(r[6] for r in sel) else 'NO':>11}")
    print(f"after the run: {load_line()}")


if __name__ == "__main__":
    main()
