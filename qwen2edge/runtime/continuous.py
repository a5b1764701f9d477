"""In-flight (continuous) batching: sequences join and leave a running batch between decode steps.

A static batch runs until its slowest row ends, so a request arriving meanwhile waits for all of it.
Here the batch holds up to `slots` cache rows (allocated as needed, doubling); live rows occupy rows
[0, n) and every decode step runs on a view of exactly those rows. A newcomer is prefilled straight into the next free rows (its prompt's
keys/values land in the shared cache, no copy), and its first token is sampled with everyone
else's next one. When rows finish, the last live rows move into the holes, so the batch stays
dense. Each row keeps its own sampler and stop state (`generator.Row`), so its output does not
depend on who else is in the batch. Host caches only (`Backend.in_flight_batching`).
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import numpy as np

from ..errors import InternalError
from .generator import Generation, Generator, Row
from .kv_cache import KVCache

OnText = Callable[[Hashable, str], None]  # (key, text delta)
OnFinish = Callable[[Hashable, Generation], None]  # (key, complete result)
ShouldStop = Callable[[Hashable], bool]  # (key) -> cancel this row now


class InFlightBatch:
    """Rows that come and go over one cache of `slots` rows. Not thread-safe: one owner thread."""

    def __init__(self, generator: Generator, slots: int):
        if not generator.backend.in_flight_batching:
            raise InternalError(f"the {generator.backend.name} backend has no in-flight batching: report this as a "
                                "qwen2edge bug (its requests run as static batches)")
        self.gen = generator
        self.slots = slots
        self.rows: list[Row] = []
        self.keys: list[Hashable] = []
        self.cache: KVCache | None = None  # up to `slots` rows, allocated on the first admission
        self._logits = np.zeros((0, 0), dtype=np.float32)  # [n, V]: each live row's next-token logits
        self._views: dict[int, KVCache] = {}  # rows n -> view of rows [0, n)
        self._views_version = -1

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def free(self) -> int:
        """Rows that can be admitted now."""
        return self.slots - len(self.rows)

    def admit(self, items: Sequence[tuple[Hashable, Row]]) -> None:
        """Prefill new rows (key, Row from `Generator.new_row`) into the next free cache rows; their first
        token is sampled by the next `step`."""
        if not items:
            return
        if len(items) > self.free:
            raise InternalError(f"{len(items)} rows do not fit the {self.free} free slots: report this as a "
                                "qwen2edge bug")
        prompts = [row.result.prompt_ids for _, row in items]
        longest = max(len(p) for p in prompts)
        start, k = len(self.rows), len(items)
        if self.cache is None:  # rows for these newcomers only: zeroing all `slots` rows costs TTFT
            self.cache = self.gen.new_cache(k, longest)
        self.cache.reserve_rows(start + k, self.slots)
        self.cache.reserve(longest)  # on the whole cache: a view does not grow
        logits = self.gen.prefill(self._view(start, start + k), prompts)
        self._logits = logits if start == 0 else np.concatenate([self._logits[:start], logits])
        self.keys += [key for key, _ in items]
        self.rows += [row for _, row in items]

    def step(self, on_text: OnText | None = None, on_finish: OnFinish | None = None,
             should_stop: ShouldStop | None = None) -> None:
        """Sample every live row's next token, retire the rows that are complete (on_finish), and run one
        decode step for the others."""
        n = len(self.rows)
        if n == 0:
            return
        toks = np.full(n, self.gen.pad_id, dtype=np.int64)
        ended = []
        for i, (key, row) in enumerate(zip(self.keys, self.rows)):
            emit = (lambda d, key=key: on_text(key, d)) if on_text else None
            if should_stop is not None and should_stop(key):
                row.cancel()
                complete = True
            else:
                toks[i] = row.sample(self._logits[i:i + 1])
                complete = row.accept(int(toks[i]), emit)
            if complete:
                ended.append(i)
                result = row.finish(emit)
                if on_finish:
                    on_finish(key, result)
        toks = self._compact(ended, toks)
        if not self.rows:
            self._release()  # idle: free the cache
            return
        lengths = np.array([row.length for row in self.rows], dtype=np.int64)
        self.cache.fit(int(lengths.max()) + 1)  # grows, or shrinks after long rows left
        self._logits = self.gen.decode_one(self._view(0, len(self.rows)), toks, lengths)
        for row in self.rows:
            row.length += 1

    def abandon(self) -> list[tuple[Hashable, Row]]:
        """Drop every row (after a backend failure); returns them so the caller can fail their requests."""
        out = list(zip(self.keys, self.rows))
        self.rows, self.keys = [], []
        self._release()
        return out

    def _release(self) -> None:
        self.cache, self._views, self._logits = None, {}, np.zeros((0, 0), dtype=np.float32)

    def _compact(self, ended: list[int], toks: np.ndarray) -> np.ndarray:
        """Remove ended rows, moving the last live rows (cache rows included) into their places."""
        if not ended:
            return toks
        n, m = len(self.rows), len(self.rows) - len(ended)
        gone = set(ended)
        holes = [i for i in ended if i < m]
        movers = [j for j in range(m, n) if j not in gone]
        for h, j in zip(holes, movers):
            self.cache.move_row(j, h)
            self.rows[h], self.keys[h], toks[h] = self.rows[j], self.keys[j], toks[j]
        del self.rows[m:], self.keys[m:]
        return toks[:m]

    def _view(self, start: int, stop: int) -> KVCache:
        if start:  # a newcomers' prefill: used once
            return self.cache.view(start, stop)
        # Decode views [0, n) are kept, so the backend's per-cache bindings survive across steps; they
        # are dropped when the cache is reallocated (they would keep the old arrays alive).
        if self._views_version != self.cache.version:
            self._views, self._views_version = {}, self.cache.version
        view = self._views.get(stop)
        if view is None:
            view = self._views[stop] = self.cache.view(0, stop)
        return view
