"""Prometheus metrics for the server, in a registry of its own (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds; spans a tiny CPU model (ms) up to long generations on a Jetson (minutes).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Request, token, latency and queue metrics; `render()` gives the Prometheus text format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("qwen2edge_requests", "HTTP requests answered, by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("qwen2edge_generations", "Generations ended, by finish reason "
                                "(stop, length, cancelled, error).", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("qwen2edge_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("qwen2edge_generation_tokens", "Tokens generated.", registry=r)
        self.latency = Histogram("qwen2edge_request_latency_seconds", "Time from request to last token.",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("qwen2edge_time_to_first_token_seconds", "Time from request to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("qwen2edge_queue_wait_seconds", "Time a request waited for a batch slot.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("qwen2edge_queue_depth", "Requests waiting for a batch slot.", registry=r)
        self.running = Gauge("qwen2edge_requests_running", "Requests being generated now.", registry=r)
        self.draft_tokens = Counter("qwen2edge_speculative_tokens", "Speculative draft tokens verified (drafted) "
                                    "and accepted.", ["kind"], registry=r)
        self.prefix_reused = Counter("qwen2edge_prefix_cache_reused_tokens", "Prompt tokens whose keys/values "
                                     "came from the prefix cache instead of a prefill.", registry=r)
        self.batch_size = Histogram("qwen2edge_batch_size",
                                    "Rows per decode step (in-flight batching) or per batch (static).",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
