"""Load test for `qwen2edge serve`: throughput and latency at several concurrency levels.

Against a running server (--url), or one this script starts on a bundle (--bundle, default: the
`qwen2edge demo` bundle of SmolLM2-135M-Instruct in ~/.cache/qwen2edge). Each level runs N streaming
chat requests (greedy, fixed max_tokens) from C concurrent clients and prints one table row:
completion tokens/s and requests/s over the level's wall time, p50/p95 end-to-end latency and p50/p95
time to first token, and the throughput relative to concurrency 1 measured in the same run. With
several --batching modes (default: in-flight and static), each gets its own server on the same
bundle in the same run, and a last column compares in-flight with static at each level.

    python benchmarks/serve_load.py                       # starts servers on the demo bundle
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model NAME
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import httpx

DEMO_BUNDLE = Path(os.environ.get("QWEN2EDGE_CACHE", Path.home() / ".cache" / "qwen2edge")) / \
    "smollm2-135m-instruct-onnx-fp32"
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 12 times 12?",
             "Who wrote Hamlet?", "Give me a synonym for happy.", "What is the boiling point of water?",
             "Name a planet in the solar system.", "What language is spoken in Brazil?"]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


async def sse_events(http: httpx.AsyncClient, url: str, body: dict) -> AsyncIterator[dict]:
    """The JSON events of one server-sent-event response to POST `body` (an HTTP error raises)."""
    async with http.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}")
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


async def one_request(http: httpx.AsyncClient, i: int, url: str, model: str, max_tokens: int) -> dict:
    """One streaming chat request to `qwen2edge serve`: latency, time to first token, completion tokens."""
    body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async for event in sse_events(http, f"{url}/v1/chat/completions", body):
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        elif ttft is None and event["choices"] and event["choices"][0]["delta"].get("content"):
            ttft = time.perf_counter() - t0
    return {"latency": time.perf_counter() - t0, "ttft": ttft or 0.0, "tokens": tokens}


Send = Callable[[httpx.AsyncClient, int], Awaitable[dict]]  # (client, request index) -> latency, ttft, tokens


async def run_level(send: Send, concurrency: int, requests: int) -> dict:
    """`requests` requests from `concurrency` clients, each sending its next one when the last is done."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    results: list[dict] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            results.append(await send(http, queue.get_nowait()))

    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    return {"concurrency": concurrency, "requests": requests, "tokens": sum(r["tokens"] for r in results),
            "wall_s": wall, "tok_s": sum(r["tokens"] for r in results) / wall, "req_s": requests / wall,
            "p50": statistics.median(lat), "p95": percentile(lat, 95),
            "ttft50": statistics.median(ttft), "ttft95": percentile(ttft, 95)}


def start_server(bundle: Path, port: int, max_concurrency: int, max_batch: int, batching: str,
                 *extra: str) -> subprocess.Popen:
    """`qwen2edge serve` on 127.0.0.1:port (model id "bench"), once /health answers; `extra` are more options."""
    cmd = [sys.executable, "-m", "qwen2edge.cli", "serve", str(bundle), "--port", str(port), "--served-model-name",
           "bench", "--max-concurrency", str(max_concurrency), "--max-batch", str(max_batch), "--max-queue", "256",
           "--batching", batching, *extra]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("the server did not start in 5 minutes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start one on --bundle)")
    ap.add_argument("--model", default="bench", help="model id the server serves (with --url)")
    ap.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--max-concurrency", type=int, default=16, help="server setting when started here")
    ap.add_argument("--max-batch", type=int, default=16, help="server setting when started here")
    ap.add_argument("--levels", default="1,4,16", help="client concurrency levels")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batching", default="in-flight,static", help="server modes to compare (started here)")
    args = ap.parse_args()

    rows = []
    modes = ["(as running)"] if args.url else args.batching.split(",")
    for mode in modes:
        proc = None
        url, model = args.url, args.model
        if url is None:
            if not (args.bundle / "manifest.json").is_file():
                sys.exit(f"no bundle at {args.bundle}: run `qwen2edge demo` once, or pass --bundle / --url")
            print(f"starting a server with --batching {mode}", file=sys.stderr)
            proc = start_server(args.bundle, args.port, args.max_concurrency, args.max_batch, mode)
            url, model = f"http://127.0.0.1:{args.port}", "bench"
        send = partial(one_request, url=url, model=model, max_tokens=args.max_tokens)
        try:
            asyncio.run(run_level(send, 1, 1))  # warm-up: sessions, allocator, caches
            for c in (int(x) for x in args.levels.split(",")):
                row = asyncio.run(run_level(send, c, max(4, c * args.requests_per_client)))
                rows.append({"mode": mode, **row})
                print(f"  {mode}, concurrency {c}: done in {row['wall_s']:.1f} s", file=sys.stderr)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)

    print(f"\nmodel {args.model if args.url else args.bundle.name}, greedy chat, max_tokens {args.max_tokens}, "
          f"streaming; server --max-concurrency {args.max_concurrency} --max-batch {args.max_batch}; "
          f"{os.cpu_count()} CPUs visible")
    head = ("batching", "concurrency", "requests", "tokens", "tok/s", "req/s", "p50 s", "p95 s", "TTFT p50",
            "TTFT p95", "tok/s vs c=1", "tok/s vs static")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    base = {r["mode"]: r["tok_s"] for r in reversed(rows)}  # each mode's first level
    static = {r["concurrency"]: r["tok_s"] for r in rows if r["mode"] == "static"}
    for r in rows:
        vs = f"{r['tok_s'] / static[r['concurrency']]:.2f}x" if r["concurrency"] in static else "-"
        print(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f} | "
              f"{r['req_s']:.2f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['ttft50']:.2f} | {r['ttft95']:.2f} | "
              f"{r['tok_s'] / base[r['mode']]:.2f}x | {vs} |")


if __name__ == "__main__":
    main()
