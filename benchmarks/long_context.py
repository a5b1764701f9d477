"""Decode cost at long context: plain RoPE vs YaRN vs Dual Chunk Attention, on ONNX Runtime CPU.

A randomly initialised checkpoint of the Qwen2-0.5B shape (hidden 896, 24 layers, 14 heads, 2 KV
heads, intermediate 4864, vocab 151936, tied embeddings; fp32) is exported once per (mode, max_seq_len)
through `export_bundle` (YaRN and DCA via the same overrides as `qwen2edge export`). Each bundle is
then timed in a fresh subprocess: a short prefill, then single-token decode steps at positions near
the END of the cache, so DCA uses all three position sets and every step attends over a full cache
(the graph's cost depends on how many slots it is handed, not on how many are valid).

With --short-context N it also times steps at position N of the same long bundle twice: with a
cache of max_seq_len slots (what every step attended before the cache could grow; schema-1
bundles still do) and with the cache the generator now uses, grown in buckets to the sequence.

Prints one table: decode tokens/s (median step), and the subprocess's resident memory after the
end-of-cache steps (VmRSS) and its peak (VmHWM). Progress goes to stderr. Needs the `export` and
`dev` extras.

  python benchmarks/long_context.py                 # 2k, 8k, 32k; 12 timed steps each
  python benchmarks/long_context.py --short-context 512   # also: short sequences in long bundles
  python benchmarks/long_context.py --lengths 2048 --steps 4 --tiny   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN2_05B = dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                 vocab_size=151936, tie=True, max_position_embeddings=32768, extra_config={"rope_theta": 1e6})
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96, vocab_size=151936,
            tie=True, max_position_embeddings=32768, extra_config={"rope_theta": 1e6})


def mode_overrides(mode: str):
    """Export overrides per mode (YaRN: 4x over 8k; DCA: C=8192, w=1024 -> period 7168, temperature L0=8192)."""
    from qwen2edge.config import LongContextOverrides

    if mode == "yarn":
        return LongContextOverrides(rope_scaling="yarn", rope_factor=4.0, original_max_position_embeddings=8192)
    if mode == "dca":
        return LongContextOverrides(dca_chunk_size=8192, dca_local_size=1024, dca_original_max_position_embeddings=8192)
    return LongContextOverrides()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure(bundle_dir: str, steps: int, warmup: int, short: int = 0) -> dict:
    """Runs in the child process: decode `steps` + `warmup` tokens at the end of the cache (and at
    position `short` with a full-size and a grown cache when short > 0)."""
    import numpy as np

    from qwen2edge.runtime.bundle import Bundle
    from qwen2edge.runtime.generator import decode_feed, prefill_feed
    from qwen2edge.runtime.kv_cache import cache_capacity

    bundle = Bundle.open(bundle_dir, verify=False)
    gen = bundle.generator("ort")  # its step adds the DCA inputs of DCA bundles
    backend, step, max_len = gen.backend, gen.step, bundle.max_seq_len

    def timed(cache, start: int) -> float:
        """Median seconds of a decode step at positions start, start+1, ... over `cache`."""
        for arr in cache.arrays.values():
            arr.fill(0.01)  # a full context's cache is resident; untouched zero pages would not count in RSS
        cap = cache.capacity
        step(cache, prefill_feed([list(range(100, 116))], cap, 0), np.zeros(1, dtype=np.int64))
        times = []
        for i in range(steps + warmup):
            pos = np.array([start + i], dtype=np.int64)
            t0 = time.perf_counter()
            step(cache, decode_feed(np.array([42]), pos, cap), pos)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[warmup:])

    start = max_len - steps - warmup - 1
    out = {"step_s": timed(backend.new_cache(1), start), "start_pos": start}
    status = Path("/proc/self/status").read_text()
    kb = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines() if line.startswith(("VmRSS", "VmHWM"))}
    out.update(rss_mib=kb["VmRSS"] / 1024, hwm_mib=kb["VmHWM"] / 1024)
    if 0 < short and short + steps + warmup < max_len:
        out["short_full_s"] = timed(backend.new_cache(1), short)
        grown = backend.new_cache(1, capacity=cache_capacity(short + steps + warmup + 1, 0, max_len))
        out["short_grown_s"], out["short_capacity"] = timed(grown, short), grown.capacity
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--modes", nargs="+", default=["plain", "yarn", "dca"], choices=["plain", "yarn", "dca"])
    ap.add_argument("--steps", type=int, default=12, help="timed decode steps per configuration (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--short-context", type=int, default=0, metavar="N",
                    help="also time steps at position N: full-size cache vs the grown cache")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model instead of the 0.5B shape (smoke test)")
    ap.add_argument("--workdir", default=None, help="where checkpoints/bundles go (default: a temp dir, removed)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.warmup, args.short_context)))
        return

    from qwen2edge.exporter.export import ExportOptions, export_bundle
    from tests.tiny_models import make_tiny_qwen2

    work = Path(args.workdir or tempfile.mkdtemp(prefix="q2e-longctx-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = work / "checkpoint"
        if not (model_dir / "config.json").is_file():
            log("creating the random checkpoint (Qwen2-0.5B shape)" if not args.tiny else "creating a tiny checkpoint")
            make_tiny_qwen2(model_dir, **(TINY if args.tiny else QWEN2_05B))
        rows = []
        total = len(args.lengths) * len(args.modes)
        for n, (length, mode) in enumerate(((l, m) for l in args.lengths for m in args.modes), 1):
            bundle = work / f"bundle-{mode}-{length}"
            log(f"({n}/{total}) exporting {mode} at max_seq_len {length}")
            t0 = time.perf_counter()
            shutil.rmtree(bundle, ignore_errors=True)
            export_bundle(model_dir, bundle, ExportOptions(max_seq_len=length, long_context=mode_overrides(mode)))
            log(f"({n}/{total}) exported in {time.perf_counter() - t0:.0f}s; timing {args.steps} decode steps")
            out = subprocess.run([sys.executable, __file__, "--child", str(bundle), "--steps", str(args.steps),
                                  "--warmup", str(args.warmup), "--short-context", str(args.short_context)],
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"measuring {bundle} failed:\n{out.stderr}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            shutil.rmtree(bundle, ignore_errors=True)  # each 0.5B bundle is ~2 GB
            rows.append((length, mode, res))
            log(f"({n}/{total}) {mode} {length}: {1 / res['step_s']:.2f} tok/s, RSS {res['rss_mib']:.0f} MiB")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    shape = "tiny 2-layer" if args.tiny else "Qwen2-0.5B shape, random weights, fp32"
    print(f"\nONNX Runtime CPU, {os.cpu_count()} cores, batch 1, {shape}; median of {args.steps} decode steps")
    print(f"{'max_seq_len':>11} {'mode':>6} {'decode tok/s':>13} {'ms/step':>9} {'RSS MiB':>9} {'peak MiB':>9} {'vs plain':>9}")
    plain = {l: r["step_s"] for l, m, r in rows if m == "plain"}
    for length, mode, r in rows:
        ratio = f"{plain[length] / r['step_s']:.2f}x" if length in plain else "-"
        print(f"{length:>11} {mode:>6} {1 / r['step_s']:>13.2f} {r['step_s'] * 1000:>9.1f} {r['rss_mib']:>9.0f} "
              f"{r['hwm_mib']:>9.0f} {ratio:>9}")
    short = [(l, m, r) for l, m, r in rows if "short_grown_s" in r]
    if short:
        print(f"\nDecode at position {args.short_context} of the same bundles: a max_seq_len cache vs the grown cache")
        print(f"{'max_seq_len':>11} {'mode':>6} {'full tok/s':>11} {'grown tok/s':>12} {'capacity':>9} {'speedup':>8}")
        for length, mode, r in short:
            print(f"{length:>11} {mode:>6} {1 / r['short_full_s']:>11.2f} {1 / r['short_grown_s']:>12.2f} "
                  f"{r['short_capacity']:>9} {r['short_full_s'] / r['short_grown_s']:>7.2f}x")


if __name__ == "__main__":
    main()
