"""Resident memory of a bundle's first load (which optimizes and saves the graph) vs later loads.

Each configuration runs in a fresh subprocess: load the bundle's ONNX Runtime backend with an empty
optimized-graph cache (first load, with and without replacing the optimizing session by the saved
graph), or with the cache already written (later load); run one 16-token prefill; print load time,
resident memory (VmRSS) and peak (VmHWM). The bundle's own `.ort-cache` is not touched.

    python benchmarks/first_load_memory.py BUNDLE_DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(bundle_dir: str, cache_dir: str, reopen: bool) -> dict:
    import numpy as np

    from qwen2edge.runtime.bundle import Bundle
    from qwen2edge.runtime.generator import prefill_feed
    from qwen2edge.runtime.ort_backend import OrtBackend

    bundle = Bundle.open(bundle_dir, verify=False)
    t0 = time.perf_counter()
    backend = OrtBackend.from_bundle(bundle, optimized_cache=cache_dir, reopen=reopen)
    load_s = time.perf_counter() - t0
    cache = backend.new_cache(1)
    backend.step(cache, prefill_feed([list(range(100, 116))], cache.capacity, 0), np.zeros(1, dtype=np.int64))
    kb = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
          if line.startswith(("VmRSS", "VmHWM"))}
    return {"load_s": load_s, "rss": kb["VmRSS"] / 1024, "peak": kb["VmHWM"] / 1024,
            "from_cache": backend.optimized_from_cache, "reopened": backend.reopened}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.child[2] == "1")))
        return
    if not args.bundle:
        ap.error("give a bundle directory")
    work = Path(tempfile.mkdtemp(prefix="q2e-firstload-"))
    rows = []
    try:
        for label, reopen, fresh in (("first load, optimizing session kept", "0", True),
                                     ("first load, saved graph reloaded", "1", True),
                                     ("later load (from the cache)", "1", False)):
            cache_dir = work / "cache"
            if fresh:
                shutil.rmtree(cache_dir, ignore_errors=True)
            print(f"{label} ...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--child", args.bundle, str(cache_dir), reopen],
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{label} failed:\n{out.stderr}")
            rows.append((label, json.loads(out.stdout.strip().splitlines()[-1])))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{Path(args.bundle).name}: ONNX Runtime CPU, one 16-token prefill after loading")
    print(f"{'load':<38} {'load s':>7} {'RSS MiB':>8} {'peak MiB':>9}")
    for label, r in rows:
        print(f"{label:<38} {r['load_s']:>7.1f} {r['rss']:>8.0f} {r['peak']:>9.0f}")


if __name__ == "__main__":
    main()
