"""Triton vs `qwen2edge serve`: throughput and latency of the same bundle at several client concurrencies.

Three servers on the same bundle (default: the `qwen2edge demo` bundle of SmolLM2-135M-Instruct), one
after the other, each given the same cores and the same number of batch rows:

- `qwen2edge serve` (OpenAI chat API), --max-concurrency R --max-batch R, ONNX Runtime on every core;
- tritonserver over `qwen2edge triton-repo`, 1 instance of R rows on every core;
- tritonserver, 2 instances of R/2 rows, each with half the cores.

Each level sends N streaming requests (greedy, fixed max_tokens, the chat questions of serve_load.py)
from C concurrent clients. Triton gets the prompt rendered with the bundle's chat template (what serve
renders itself), so both see the same token ids. Rows: completion tokens/s and requests/s over the
level's wall time, p50/p95 latency and time to first token, and tok/s relative to serve at that level.
The tritonserver comes from the nvidia-pytriton wheel (qwen2edge.triton.local, cached in .cache/triton).

    python benchmarks/triton_load.py [--bundle DIR] [--max-tokens 64] [--levels 1,4,16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import httpx

from serve_load import DEMO_BUNDLE, QUESTIONS, one_request, run_level, sse_events, start_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen2edge.runtime.tokenizer import BundleTokenizer  # noqa: E402
from qwen2edge.triton.local import TritonInstall, TritonServer  # noqa: E402
from qwen2edge.triton.repo import RepoOptions, write_triton_repo  # noqa: E402


async def triton_request(http: httpx.AsyncClient, i: int, url: str, model: str, prompts: list[str],
                         max_tokens: int) -> dict:
    """One /generate_stream request (stream: true): latency, time to first token, generated tokens."""
    body = {"text_input": prompts[i % len(prompts)], "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async for event in sse_events(http, f"{url}/v2/models/{model}/generate_stream", body):
        if "error" in event:
            raise RuntimeError(event["error"])
        if ttft is None and event.get("text_output"):
            ttft = time.perf_counter() - t0
        ids = event.get("output_ids", [])
        tokens += len(ids) if isinstance(ids, list) else 1  # the generate endpoint unwraps one id
    return {"latency": time.perf_counter() - t0, "ttft": ttft or 0.0, "tokens": tokens}


def measure(send, levels: list[int], per_client: int, label: str) -> list[dict]:
    asyncio.run(run_level(send, 1, 1))  # warm-up: sessions, allocator, caches
    rows = []
    for c in levels:
        row = asyncio.run(run_level(send, c, max(4, c * per_client)))
        rows.append({"server": label, **row})
        print(f"  {label}, concurrency {c}: done in {row['wall_s']:.1f} s", file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    ap.add_argument("--rows", type=int, default=16, help="batch rows per server (split across Triton instances)")
    ap.add_argument("--levels", default="1,4,16", help="client concurrency levels")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8765, help="for qwen2edge serve")
    ap.add_argument("--triton-cache", type=Path, default=ROOT / ".cache" / "triton")
    args = ap.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        sys.exit(f"no bundle at {args.bundle}: run `qwen2edge demo` once, or pass --bundle")
    levels = [int(x) for x in args.levels.split(",")]
    cores = len(os.sched_getaffinity(0))
    tokenizer = BundleTokenizer.from_dir(args.bundle)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    rows: list[dict] = []
    load_before = os.getloadavg()[0]

    print(f"starting qwen2edge serve --max-concurrency {args.rows} --max-batch {args.rows}", file=sys.stderr)
    proc = start_server(args.bundle, args.port, args.rows, args.rows, "in-flight")
    try:
        send = partial(one_request, url=f"http://127.0.0.1:{args.port}", model="bench", max_tokens=args.max_tokens)
        rows += measure(send, levels, args.requests_per_client, "qwen2edge serve")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

    install = TritonInstall.prepare(args.triton_cache)
    with tempfile.TemporaryDirectory(prefix="triton-bench-") as tmp:
        for instances in (1, 2):
            label = f"triton, {instances} instance{'s' if instances > 1 else ''}"
            repo = Path(tmp) / f"repo{instances}"
            write_triton_repo(args.bundle, repo, RepoOptions(name="bench", instances=instances,
                                                             max_batch=args.rows // instances,
                                                             threads=max(1, cores // instances) if instances > 1 else 0))
            print(f"starting tritonserver: {label}", file=sys.stderr)
            with TritonServer(install, repo, Path(tmp) / f"server{instances}.log") as server:
                send = partial(triton_request, url=server.url, model="bench", prompts=prompts,
                               max_tokens=args.max_tokens)
                rows += measure(send, levels, args.requests_per_client, label)

    print(f"\nmodel {args.bundle.name}, greedy chat, max_tokens {args.max_tokens}, streaming; {args.rows} batch rows "
          f"per server (Triton 2 instances: {args.rows // 2} rows and {max(1, cores // 2)} threads each); "
          f"{cores} CPUs visible")
    head = ("server", "concurrency", "requests", "tokens", "tok/s", "req/s", "p50 s", "p95 s", "TTFT p50",
            "TTFT p95", "tok/s vs serve")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    serve = {r["concurrency"]: r["tok_s"] for r in rows if r["server"] == "qwen2edge serve"}
    for r in rows:
        print(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f} | "
              f"{r['req_s']:.2f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['ttft50']:.2f} | {r['ttft95']:.2f} | "
              f"{r['tok_s'] / serve[r['concurrency']]:.2f}x |")
    print(f"1-minute load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (on {cores} CPUs: other "
          "processes share them; compare servers only within one run)")


if __name__ == "__main__":
    main()
