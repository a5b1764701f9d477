"""CPU decode benchmark: qwen2edge (fp32, int8, int4) against its peers, side by side, one run.

Model: Qwen2-0.5B's shape with random weights; batch 1, a 128-token prompt, exactly 128 greedy new
tokens, all cores the process may use. Each engine runs in its own subprocess (so peak RSS is its
own), the engines interleaved within each repeat (so drift hits all alike); each figure is the
median over --repeats. Also measures the memory read bandwidth and prints each row's decode floor:
weight bytes read per token / bandwidth.

    python benchmarks/bench_decode.py --repeats 3          # see benchmarks/README.md for the venv
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import prepare  # noqa: E402
from prepare import Unavailable  # noqa: E402


@dataclass
class Row:
    engine: str
    precision: str
    fmt: str  # weight format: fp32 fp16 int8 q8_0 int4 q4_0 q4_k_m (which qwen2edge row it is compared with)
    build: Any  # () -> path (may raise Unavailable)
    ours: bool = False
    path: Path | None = None
    why: str = ""
    runs: list[dict[str, float]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.engine} {self.precision}"

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.runs) if self.runs else float("nan")


def rows_for(work: Path, ckpt: Path, max_seq_len: int, engines: set[str], log) -> list[Row]:
    spec = [
        ("qwen2edge", "fp32", "fp32", lambda: prepare.bundle(work, ckpt, None, max_seq_len, log), True),
        ("qwen2edge", "int8", "int8", lambda: prepare.bundle(work, ckpt, "int8", max_seq_len, log), True),
        ("qwen2edge", "int4", "int4", lambda: prepare.bundle(work, ckpt, "int4", max_seq_len, log), True),
        ("transformers", "fp32 eager", "fp32", lambda: ckpt, False),
        ("optimum", "fp32", "fp32", lambda: prepare.optimum_model(work, ckpt, log), False),
        ("genai", "fp32", "fp32", lambda: prepare.genai_model(work, ckpt, "fp32", log), False),
        ("genai", "int4", "int4", lambda: prepare.genai_model(work, ckpt, "int4", log), False),
        ("llama.cpp", "F32", "fp32", lambda: prepare.gguf_file(work, ckpt, "F32", log), False),
        ("llama.cpp", "F16", "fp16", lambda: prepare.gguf_file(work, ckpt, "F16", log), False),
        ("llama.cpp", "Q8_0", "q8_0", lambda: prepare.gguf_file(work, ckpt, "Q8_0", log), False),
        ("llama.cpp", "Q4_0", "q4_0", lambda: prepare.gguf_file(work, ckpt, "Q4_0", log), False),
        ("llama.cpp", "Q4_K_M", "q4_k_m", lambda: prepare.gguf_file(work, ckpt, "Q4_K_M", log), False),
    ]
    return [Row(e, p, f, b, ours) for e, p, f, b, ours in spec if not engines or e in engines]


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_one(row: Row, args: argparse.Namespace) -> dict[str, float] | str:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", row.engine, "--path", str(row.path),
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode < 0 and row.engine == "llama.cpp":
        return prepare.llama_crash(res.returncode)
    if res.returncode != 0 or not lines:
        tail = (res.stderr or res.stdout).strip().splitlines()
        return f"failed: {tail[-1][:140] if tail else 'exit ' + str(res.returncode)}"
    return json.loads(lines[-1])


def matched(row: Row, rows: list[Row]) -> Row | None:
    """The qwen2edge row a peer is compared with: same weight bits (F16 and Q8_0 -> int8)."""
    want = {"fp32": "fp32", "fp16": "int8", "q8_0": "int8", "int8": "int8", "int4": "int4", "q4_0": "int4",
            "q4_k_m": "int4"}[row.fmt]
    return next((r for r in rows if r.ours and r.fmt == want and r.runs), None)


def step_bytes(row: Row, cfg: dict[str, Any]) -> float:
    """Weight bytes one decode step reads: counted from the artifact when there is one (exact for
    every format and llama.cpp's type mixes), else from the shape (transformers' checkpoint)."""
    got = prepare.artifact_weight_bytes(row.path) if row.path is not None else None
    if got is None and row.fmt in ("q4_k_m",):
        return float("nan")
    return got if got else prepare.weight_bytes_per_token(cfg, row.fmt)


def table(rows: list[Row], cfg: dict[str, Any], bandwidth: float) -> str:
    head = (f"{'engine':<26}{'model MB':>9}{'MB/token':>9}{'TTFT ms':>9}{'decode tok/s':>13}{'floor tok/s':>12}"
            f"{'% floor':>8}{'peak RSS MB':>12}   {'qwen2edge / this: decode (higher better), TTFT (lower better)'}")
    out = [head, "-" * len(head)]
    for r in rows:
        per_token = step_bytes(r, cfg)
        floor = bandwidth / per_token
        if not r.runs:
            out.append(f"{r.name:<26}{'':>9}{'':>9}{'':>9}{'':>13}{floor:>12.1f}{'':>8}{'':>12}   unavailable: {r.why}")
            continue
        tps, ttft = r.median("decode_tps"), r.median("ttft_s") * 1000
        ratio = ""
        m = matched(r, rows)
        if m is not None and not r.ours:
            ratio = (f"{m.precision}: decode {m.median('decode_tps') / tps:.2f}x, "
                     f"TTFT {m.median('ttft_s') * 1000 / ttft:.2f}x")
        size = prepare.model_mb(r.path) if r.path else float("nan")
        out.append(f"{r.name:<26}{size:>9.0f}{per_token / 1e6:>9.0f}{ttft:>9.0f}{tps:>13.2f}{floor:>12.1f}{tps / floor:>8.0%}"
                   f"{r.median('peak_rss_mb'):>12.0f}   {ratio}")
    return "\n".join(out)


# Issue #16's decode targets: our row at least as fast as llama.cpp's of the same width.
DECODE_TARGETS = (("qwen2edge int4", "llama.cpp Q4_0"), ("qwen2edge int8", "llama.cpp Q8_0"),
                  ("qwen2edge fp32", "llama.cpp F32"))


def verdicts(rows: list[Row]) -> str:
    """One line per target: decode against llama.cpp at each width, TTFT against the best peer of that width."""
    ran = {r.name: r for r in rows if r.runs}
    out = []
    for ours, peer in DECODE_TARGETS:
        if ours in ran and peer in ran:
            a, b = ran[ours].median("decode_tps"), ran[peer].median("decode_tps")
            out.append(f"decode {ours} >= {peer}: {'met' if a >= b else 'not met'} ({a:.2f} vs {b:.2f} tok/s, {a / b:.2f}x)")
    for r in (r for r in rows if r.ours and r.runs):
        peers = [p for p in rows if not p.ours and p.runs and matched(p, rows) is r]
        if peers:
            best = min(peers, key=lambda p: p.median("ttft_s"))
            a, b = r.median("ttft_s") * 1000, best.median("ttft_s") * 1000
            out.append(f"TTFT {r.name} <= best peer of its width ({best.name}): {'met' if a <= b else 'not met'} "
                       f"({a:.0f} vs {b:.0f} ms)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="Runs per engine (median reported).")
    ap.add_argument("--work-dir", type=Path, default=Path(os.environ.get("QWEN2EDGE_BENCH_DIR",
                                                                       Path.home() / ".cache/qwen2edge/bench")))
    ap.add_argument("--tiny", action="store_true", help="A 2-layer model of the same vocab (smoke test).")
    ap.add_argument("--engines", default="", help="Comma-separated subset: qwen2edge,transformers,optimum,genai,llama.cpp")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=cores())
    ap.add_argument("--worker-timeout", type=int, default=1800)
    ap.add_argument("--json", type=Path, default=None, help="Also write every run's figures here.")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        from engines import run_worker

        print(json.dumps(run_worker(args.worker, args.path, args.prompt_len, args.new_tokens, args.threads)))
        return 0

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    shape = prepare.TINY if args.tiny else prepare.QWEN2_05B
    work = args.work_dir / ("tiny" if args.tiny else "qwen2-0.5b-shape")
    work.mkdir(parents=True, exist_ok=True)
    ckpt = prepare.checkpoint(work, shape, log)
    cfg = prepare.read_config(ckpt)
    engines = {e.strip() for e in args.engines.split(",") if e.strip()}
    rows = rows_for(work, ckpt, args.prompt_len + args.new_tokens, engines, log)
    for r in rows:
        try:
            r.path = Path(r.build())
        except Unavailable as exc:
            r.why = str(exc)
            log(f"{r.name}: unavailable: {r.why}")

    load_before = load_average()
    bandwidth = prepare.stream_bandwidth(threads=args.threads)
    log(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s; load average {load_before:.2f} on {cores()} cores")
    for rep in range(args.repeats):
        for r in rows:
            if r.path is None:
                continue
            t = time.perf_counter()
            got = run_one(r, args)
            if isinstance(got, str):
                r.why, r.path = got, None
                log(f"{r.name}: {got}")
                continue
            r.runs.append(got)
            log(f"[{rep + 1}/{args.repeats}] {r.name}: TTFT {got['ttft_s'] * 1000:.0f} ms, "
                f"{got['decode_tps']:.2f} tok/s ({time.perf_counter() - t:.0f}s)")
    bandwidth_after = prepare.stream_bandwidth(threads=args.threads)
    load_after = load_average()
    bw = statistics.median([bandwidth, bandwidth_after])

    print(f"\nQwen2 {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']} "
          f"(random weights); batch 1, {args.prompt_len}-token prompt, {args.new_tokens} greedy new tokens, "
          f"{args.threads} threads; medians of {args.repeats} runs")
    print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s before, {bandwidth_after / 1e9:.1f} GB/s after "
          f"(floor uses {bw / 1e9:.1f}); floor tok/s = bandwidth / weight bytes per token (MB/token, counted from each artifact)")
    print(table(rows, cfg, bw))
    print(verdicts(rows))
    busy = max(load_before, load_after) > 0.5 * cores() + 0.5
    print(f"load average {load_before:.2f} before, {load_after:.2f} after, {cores()} cores"
          + ("  WARNING: the machine was busy; timings are unreliable, re-run on a quiet machine" if busy else ""))
    if args.json:
        args.json.write_text(json.dumps({"bandwidth": bw, "load": [load_before, load_after], "rows": [
            {"name": r.name, "runs": r.runs, "why": r.why} for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
