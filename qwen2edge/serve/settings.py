"""Every `qwen2edge serve` option in one frozen object (importable without FastAPI)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import InputError

BATCHING = ("in-flight", "static")


@dataclass(frozen=True)
class ServeSettings:
    """What the server was told; `check()` refuses bad values in one line, naming the option."""

    model_name: str | None = None  # the id clients send; None: the bundle directory's name
    backend: str = "ort"
    host: str = "127.0.0.1"
    port: int = 8000
    max_concurrency: int = 8  # requests generating at once
    max_batch: int | None = None  # rows per backend batch; None: 8, or the backend's limit if smaller
    max_queue: int = 64  # requests waiting for a slot before 429
    batching: str = "in-flight"  # or "static"
    api_key: str | None = None  # required as a Bearer token on /v1 when set
    shutdown_timeout: float = 30.0  # seconds a SIGINT/SIGTERM drain waits before cancelling
    speculative: str | None = None  # "prompt-lookup" or "draft" (runtime/speculative.py)
    num_speculative_tokens: int = 5
    ngram: int = 3
    draft: str | None = None  # draft bundle directory
    prefix_cache_mb: int = 256  # keys/values of finished requests kept for prompts that start alike; 0: off
    prefill_chunk: int = 32  # positions per step while a prompt joins running requests; 0: prefill at once

    def check(self) -> "ServeSettings":
        """Raise InputError for the first bad value; returns self."""
        if not 0 <= self.port <= 65535:
            raise InputError(f"{{opt:port}} must be in 0..65535, got {self.port}: pick a free TCP port")
        for name, low in (("max_concurrency", 1), ("max_batch", 1), ("max_queue", 0)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise InputError(f"{{opt:{name}}} must be >= {low}, got {value}: pass a larger value")
        if self.shutdown_timeout < 0:
            raise InputError(f"{{opt:shutdown_timeout}} must be >= 0, got {self.shutdown_timeout}: pass seconds to "
                             "drain")
        if self.api_key is not None and not self.api_key.strip():
            raise InputError("{opt:api_key} is empty, which would serve without authentication: pass a non-empty key, "
                             "or leave {opt:api_key} out to serve without one")
        if not self.host:
            raise InputError("{opt:host} is empty: pass 127.0.0.1 (local only) or 0.0.0.0 (all interfaces)")
        if self.batching not in BATCHING:
            raise InputError(f"unknown batching {self.batching!r}: set {{opt:batching}} to {' or '.join(BATCHING)}")
        for name in ("prefix_cache_mb", "prefill_chunk"):
            if getattr(self, name) < 0:
                raise InputError(f"{{opt:{name}}} must be >= 0, got {getattr(self, name)}: pass 0 to turn it off")
        self.speculative_config()
        return self

    def speculative_config(self):
        """The checked SpeculativeConfig the speculative options ask for, or None."""
        from ..runtime.speculative import SpeculativeConfig

        if self.speculative is None and self.draft is None:
            return None
        return SpeculativeConfig(self.speculative or "draft", self.num_speculative_tokens, self.ngram,
                                 self.draft).check()

    def replace(self, **changes: object) -> "ServeSettings":
        return dataclasses.replace(self, **changes)


def decode_speedups(bundle, generator, settings: ServeSettings) -> dict:
    """The scheduler's speculation, prefix-cache and chunked-prefill keywords for these settings (a draft
    bundle is opened and checked here)."""
    from ..runtime.prefix_cache import PrefixCache
    from ..runtime.speculative import speculator_factory

    return {"speculator_factory": speculator_factory(settings.speculative_config(), bundle, generator),
            "prefix_cache": PrefixCache(settings.prefix_cache_mb << 20) if settings.prefix_cache_mb else None,
            "prefill_chunk": settings.prefill_chunk}
