"""Inter-token latency of running streams while a 1,500-token prompt joins their in-flight batch, with the
prompt prefilled at once or in chunks (`--prefill-chunk` positions per step), on the default model.

In-process (the server's InFlightBatch and generator, no HTTP): --streams greedy rows generate; then the
long prompt is admitted. A stream's inter-token gap is the time between two consecutive steps that gave
it a token, including a prefill run between them. The window is from the prompt's admission to its first
token; "running alone" measures --alone-steps steps without it, and "after it joined" as many steps once
the prompt's row decodes (every row's step then reads its cache slots: a floor no prefill scheme
changes). Each setting gets a fresh batch in the same run. Usage:
    python benchmarks/chunked_prefill_itl.py [--prompt-tokens 1500] [--chunks 0,16,32,64] [--tiny]
"""

from __future__ import annotations

import argparse
import statistics
import time

from serve_load import percentile
from spec_common import default_bundle, load_line, log, scratch, tiny_bundle
from speculative_decode import FREE, PASSAGE


def measure(gen, tok, streams: int, joiner: list[int] | None, chunk: int, window: int,
            after: bool = False) -> dict:
    """ITL over the join window (or `window` steps without a joiner); with `after`, also over `window` steps
    once the joiner decodes (its cache slots are then read by every row's step)."""
    from qwen2edge.runtime.continuous import InFlightBatch
    from qwen2edge.runtime.sampling import SamplingParams

    batch = InFlightBatch(gen, streams + 1, prefill_chunk=chunk)
    endless = SamplingParams(max_new_tokens=gen.max_seq_len - 200, stop_token_ids=(-1,))
    batch.admit([(i, gen.new_row(tok.encode(tok.chat_prompt(FREE[i % len(FREE)])), endless)) for i in range(streams)])
    for _ in range(5):  # warm-up: sessions, buffers, cache growth
        batch.step()
    gaps, t_last, t_join = [], time.perf_counter(), None
    if joiner is not None:
        t_join = time.perf_counter()
        batch.admit([("joiner", gen.new_row(joiner, SamplingParams(max_new_tokens=window + 2, stop_token_ids=(-1,))))])
    ttft = None
    for _ in range(100000):
        batch.step()
        now = time.perf_counter()
        gaps.append(now - t_last)
        t_last = now
        joined = next((e for e in batch.entries if e.key == "joiner"), None)
        if joiner is not None and joined is not None and joined.row.result.token_ids:
            ttft = now - t_join
            break
        if joiner is None and len(gaps) >= window:
            break
    out = {"steps": len(gaps), "p50": statistics.median(gaps), "p95": percentile(gaps, 95), "max": max(gaps),
           "ttft": ttft}
    if after:
        gaps, t_last = [], time.perf_counter()
        for _ in range(window):
            batch.step()
            gaps.append(time.perf_counter() - t_last)
            t_last += gaps[-1]
        out["after"] = {"steps": len(gaps), "p50": statistics.median(gaps), "p95": percentile(gaps, 95),
                        "max": max(gaps), "ttft": None}
    batch.abandon()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=1500)
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--chunks", default="0,16,32,64", help="--prefill-chunk values (0: the prompt at once)")
    ap.add_argument("--alone-steps", type=int, default=40)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer random model (smoke run)")
    args = ap.parse_args()
    from qwen2edge.runtime.bundle import Bundle

    max_len = 2048
    bundle_dir = (tiny_bundle(scratch("qwen2edge-chunk-"), max_len)[1] if args.tiny
                  else default_bundle(max_len)[1])
    bundle = Bundle.open(bundle_dir)
    gen, tok = bundle.generator(), bundle.tokenizer
    text = ""
    while len(tok.encode(text)) < args.prompt_tokens:
        text += PASSAGE + "\n"
    joiner = tok.encode(text)[:args.prompt_tokens]
    rows = []
    log("running alone")
    rows.append(("running alone", measure(gen, tok, args.streams, None, 0, args.alone_steps)))
    for chunk in (int(c) for c in args.chunks.split(",")):
        label = "joins, at once" if chunk == 0 else f"joins, chunks of {chunk}"
        log(f"{args.prompt_tokens}-token prompt {label}")
        r = measure(gen, tok, args.streams, joiner, chunk, args.alone_steps, after=chunk == 0)
        rows.append((label, r))
        if "after" in r:
            rows.append(("after it joined", r["after"]))
    alone = rows[0][1]["p95"]
    print(f"default model{' (tiny stand-in)' if args.tiny else ''} fp32, {args.streams} greedy streams, a "
          f"{args.prompt_tokens}-token prompt joins (bundle max_seq_len {max_len}); {load_line()}")
    print(f"{'setting':<24} {'steps':>5} {'p50 ITL ms':>10} {'p95 ITL ms':>10} {'max ITL ms':>10} "
          f"{'p95 vs alone':>12} {'prompt TTFT s':>13}")
    for label, r in rows:
        ttft = f"{r['ttft']:.2f}" if r["ttft"] is not None else "-"
        print(f"{label:<24} {r['steps']:>5} {r['p50'] * 1000:>10.1f} {r['p95'] * 1000:>10.1f} {r['max'] * 1000:>10.1f} "
              f"{r['p95'] / alone:>11.2f}x {ttft:>13}")


if __name__ == "__main__":
    main()
