"""Keys/values of recently finished sequences, reused by prompts that start the same way.

The next turn of a chat starts with the whole previous exchange; requests sharing a system prompt
start with it. A finished row's cache slots [0, length) hold exactly the keys/values of its first
`length` tokens (slot j = position j, runtime/generator.py), so a later prompt sharing r of those
tokens can copy them (`KVCache.copy_rows_from`) and prefill only the rest. Entries are one-row
caches (`KVCache.snapshot`), least recently used first out, bounded in bytes. Thread-safe: the
workers of a server share one.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .kv_cache import KVCache

MIN_TOKENS = 16  # shorter prefixes cost about as much to copy and track as to recompute


@dataclass
class _Entry:
    tokens: np.ndarray  # int64 [n]: the token in each cached slot
    cache: KVCache  # one row, slots [0, n)


class PrefixCache:
    """LRU store of (token ids -> one-row KV cache), at most `max_bytes` in all."""

    def __init__(self, max_bytes: int, min_tokens: int = MIN_TOKENS):
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self._next_id = 0
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0  # lookups that reused something
        self.reused_tokens = 0  # slots copied instead of recomputed

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: Sequence[int]) -> tuple[KVCache, int] | None:
        """The entry sharing the longest prefix with `prompt`, and how many of its slots to reuse: at most
        len(prompt) - 1, since the last prompt token must run to give the next token's logits."""
        ids = np.asarray(prompt, dtype=np.int64)
        with self._lock:
            best, best_len = None, 0
            for key, entry in self._entries.items():
                n = _common_prefix(entry.tokens, ids)
                if n > best_len:
                    best, best_len = key, n
            reuse = min(best_len, len(ids) - 1)
            if best is None or reuse < self.min_tokens:
                return None
            self._entries.move_to_end(best)
            self.hits += 1
            self.reused_tokens += reuse
            return self._entries[best].cache, reuse

    def insert(self, tokens: Sequence[int], snapshot: Callable[[], KVCache]) -> None:
        """Remember the keys/values of `tokens` (taken by `snapshot()` only when they are worth storing).
        Entries the new one extends are dropped: any prompt they would serve, it serves as well."""
        ids = np.asarray(tokens, dtype=np.int64)
        if len(ids) < self.min_tokens:
            return
        with self._lock:
            for key, entry in self._entries.items():
                if len(entry.tokens) >= len(ids) and _common_prefix(entry.tokens, ids) == len(ids):
                    self._entries.move_to_end(key)  # already covered by a longer entry
                    return
        cache = snapshot()  # outside the lock: a copy of the row's slots
        if cache.nbytes > self.max_bytes:
            return
        with self._lock:
            for key in [k for k, e in self._entries.items() if _common_prefix(e.tokens, ids) == len(e.tokens)]:
                self._drop(key)
            while self._entries and self.bytes + cache.nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
            self._entries[self._next_id] = _Entry(ids, cache)
            self._next_id += 1
            self.bytes += cache.nbytes

    def _drop(self, key: int) -> None:
        self.bytes -= self._entries.pop(key).cache.nbytes


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n
