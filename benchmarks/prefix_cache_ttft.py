"""Turn-2 time to first token of multi-turn chats, `qwen2edge serve` with and without the prefix cache.

Each conversation: a system prompt, a user turn quoting a passage, the (greedy) answer, then a short
second question. Turn 2's prompt starts with the whole first exchange; with the prefix cache the server
copies those keys/values instead of prefilling them again. Both servers run on the same bundle in the
same run, one after the other; TTFT is measured by a streaming client (first content chunk) and each
figure is the median over the conversations. Usage:
    python benchmarks/prefix_cache_ttft.py [--answer-tokens 48] [--conversations 3] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import time
from pathlib import Path

import httpx
from serve_load import start_server
from spec_common import default_bundle, load_line, log, scratch, tiny_bundle
from speculative_decode import CODE, PASSAGE

SYSTEM = "You are a helpful assistant. Answer questions about the text the user gives you."
CONVERSATIONS = [
    (f"Here is a text:\n\n{PASSAGE}\n\n{PASSAGE.replace('keeper', 'old sailor')}\n\nWhat does the keeper do every "
     "evening?", "And what does he write in the logbook?"),
    (f"Read this code:\n\n{CODE}\n{CODE.replace('total', 'amount')}\nWhat does the function compute?",
     "How would you add a discount parameter?"),
    (f"A story:\n\n{PASSAGE}\n\n{PASSAGE.replace('winter', 'autumn')}\n\nDescribe the weather in winter.",
     "Summarize the text in one sentence."),
]


def chat(url: str, messages: list[dict], max_tokens: int) -> dict:
    """Stream one greedy chat completion; returns its text, TTFT and prompt token count."""
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, ttft, text, usage = time.perf_counter(), None, "", {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=1800) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read().decode()[:200]}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            delta = event["choices"][0]["delta"].get("content") if event["choices"] else None
            if delta:
                ttft = ttft or time.perf_counter() - t0
                text += delta
    return {"text": text, "ttft": ttft or 0.0, "prompt_tokens": usage.get("prompt_tokens", 0)}


def reused_tokens(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("qwen2edge_prefix_cache_reused_tokens_total "):
            return float(line.split()[1])
    return 0.0


def run(bundle: Path, port: int, cache_mb: int, conversations: int, answer_tokens: int) -> dict:
    proc = start_server(bundle, port, 1, 1, "in-flight", "--prefix-cache-mb", str(cache_mb))
    url = f"http://127.0.0.1:{port}"
    try:
        chat(url, [{"role": "user", "content": "Hello"}], 4)  # warm-up
        turn1, turn2, tokens = [], [], []
        for first, second in CONVERSATIONS[:conversations]:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": first}]
            a = chat(url, messages, answer_tokens)
            messages += [{"role": "assistant", "content": a["text"]}, {"role": "user", "content": second}]
            b = chat(url, messages, 8)
            turn1.append(a["ttft"])
            turn2.append(b["ttft"])
            tokens.append(b["prompt_tokens"])
            log(f"  prefix cache {cache_mb} MB: turn 1 TTFT {a['ttft']:.2f} s, turn 2 TTFT {b['ttft']:.2f} s")
        return {"turn1": statistics.median(turn1), "turn2": statistics.median(turn2),
                "tokens": statistics.median(tokens), "reused": reused_tokens(url) / len(turn2)}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answer-tokens", type=int, default=48)
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--port", type=int, default=8766)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer random model (smoke run)")
    args = ap.parse_args()
    bundle = tiny_bundle(scratch("qwen2edge-prefix-"))[1] if args.tiny else default_bundle()[1]
    rows = {}
    for cache_mb in (0, 256):
        log(f"server with --prefix-cache-mb {cache_mb}")
        rows[cache_mb] = run(bundle, args.port, cache_mb, args.conversations, args.answer_tokens)
    print(f"default model{' (tiny stand-in)' if args.tiny else ''} fp32, `qwen2edge serve`, greedy chat, "
          f"{args.conversations} conversations, median; {load_line()}")
    print(f"{'prefix cache':<14} {'turn-1 TTFT s':>13} {'turn-2 TTFT s':>13} {'turn-2 prompt tokens':>20} "
          f"{'reused tokens':>13} {'turn-2 speedup':>14}")
    for cache_mb, r in rows.items():
        label = "off" if cache_mb == 0 else f"{cache_mb} MB"
        print(f"{label:<14} {r['turn1']:>13.3f} {r['turn2']:>13.3f} {r['tokens']:>20.0f} {r['reused']:>13.0f} "
              f"{rows[0]['turn2'] / r['turn2']:>13.2f}x")


if __name__ == "__main__":
    main()
