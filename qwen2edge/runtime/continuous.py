"""In-flight (continuous) batching: sequences join and leave a running batch between decode steps.

A static batch runs until its slowest row ends, so a request arriving meanwhile waits for all of it.
Here the batch holds up to `slots` cache rows (allocated as needed, doubling); its rows occupy cache
rows [0, n) and every step runs on a view of exactly those rows. A newcomer is prefilled straight into
the next free rows (its prompt's keys/values land in the shared cache, no copy), and its first token
is sampled with everyone else's next one. When rows finish, the last rows move into the holes, so the
batch stays dense. Each row keeps its own sampler and stop state (`generator.Row`), so its output does
not depend on who else is in the batch. Host caches only (`Backend.in_flight_batching`).

Optional, each leaving every row's output as it is without them:
- speculation (`runtime/speculative.py`): each step verifies the live rows' draft tokens, so rows feed
  different numbers of tokens (shorter ones padded);
- a prefix cache (`runtime/prefix_cache.py`): a newcomer copies the keys/values of the longest prefix of
  its prompt a finished row left behind, and prefills only the rest;
- chunked prefill (`prefill_chunk` positions per step): a newcomer joining running rows is prefilled a
  chunk per step, in the same step as their tokens, so their inter-token latency stays bounded instead
  of waiting for a whole long prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import numpy as np

from ..errors import InternalError
from .generator import Generation, Generator, Row
from .kv_cache import KVCache

OnText = Callable[[Hashable, str], None]  # (key, text delta)
OnFinish = Callable[[Hashable, Generation], None]  # (key, complete result)
ShouldStop = Callable[[Hashable], bool]  # (key) -> cancel this row now


@dataclass(eq=False)
class _Entry:
    """A cache row's sequence: live (filled None) or still being prefilled (`filled` prompt tokens)."""

    key: Hashable
    row: Row
    logits: np.ndarray | None = None  # [T, V] after the row's fed token and each of its drafts
    draft: object = None  # the speculative Draft those logits verify
    token: int = 0  # the last accepted token: the next step feeds it
    filled: int | None = None


class InFlightBatch:
    """Rows that come and go over one cache of `slots` rows. Not thread-safe: one owner thread."""

    def __init__(self, generator: Generator, slots: int, *, speculator=None, prefix_cache=None,
                 prefill_chunk: int = 0):
        if not generator.backend.in_flight_batching:
            raise InternalError(f"the {generator.backend.name} backend has no in-flight batching: report this as a "
                                "qwen2edge bug (its requests run as static batches)")
        self.gen = generator
        self.slots = slots
        self.speculator = speculator
        self.prefix_cache = prefix_cache
        self.prefill_chunk = prefill_chunk  # positions per step while a newcomer is prefilled; 0: at once
        self.entries: list[_Entry] = []  # in cache row order
        self.cache: KVCache | None = None  # up to `slots` rows, allocated on the first admission
        self._views: dict[int, KVCache] = {}  # rows n -> view of rows [0, n)
        self._views_version = -1

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def rows(self) -> list[Row]:
        return [e.row for e in self.entries]

    @property
    def free(self) -> int:
        """Rows that can be admitted now."""
        return self.slots - len(self.entries)

    def admit(self, items: Sequence[tuple[Hashable, Row]]) -> None:
        """Take new rows (key, Row from `Generator.new_row`) into the next free cache rows: prefilled now
        (after copying a cached prefix), or chunk by chunk in the coming steps when rows are running and
        chunked prefill is on. A row's first token is sampled by the step after its prefill."""
        if not items:
            return
        if len(items) > self.free:
            raise InternalError(f"{len(items)} rows do not fit the {self.free} free slots: report this as a "
                                "qwen2edge bug")
        prompts = [row.result.prompt_ids for _, row in items]
        longest = max(len(p) for p in prompts)
        start, k = len(self.entries), len(items)
        if self.cache is None:  # rows for these newcomers only: zeroing all `slots` rows costs TTFT
            self.cache = self.gen.new_cache(k, longest)
        self.cache.reserve_rows(start + k, self.slots)
        self.cache.reserve(longest)  # on the whole cache: a view does not grow
        running = any(e.filled is None for e in self.entries)
        new = [_Entry(key, row, filled=self._reuse(start + j, row.result.prompt_ids))
               for j, (key, row) in enumerate(items)]
        self.entries += new
        # Chunked: only behind running rows, and within the range where chunks equal one prefill (DCA).
        now = [not (self.prefill_chunk and running and len(p) <= self.gen.exact_until) for p in prompts]
        if not any(now):
            return
        view = self._view(start, start + k)
        if all(now) and all(e.filled == 0 for e in new):
            logits = self.gen.prefill(view, prompts)
        else:
            logits = self.gen.extend(view, [p[e.filled:] if go else [] for e, p, go in zip(new, prompts, now)],
                                     np.array([e.filled for e in new]))
        for j, (e, go) in enumerate(zip(new, now)):
            if go:
                e.logits, e.filled = logits[j:j + 1], None

    def step(self, on_text: OnText | None = None, on_finish: OnFinish | None = None,
             should_stop: ShouldStop | None = None) -> None:
        """Accept every live row's next token(s), retire the rows that are complete (on_finish), and run one
        step for the others: their next tokens (with drafts) and the next chunk of rows in prefill."""
        if not self.entries:
            return
        ended = []
        for i, e in enumerate(self.entries):
            emit = (lambda d, key=e.key: on_text(key, d)) if on_text else None
            if should_stop is not None and should_stop(e.key):
                e.row.cancel()
            elif e.filled is not None:
                continue  # still in prefill
            elif self.speculator is None:
                e.token = e.row.sample(e.logits)
                if not e.row.accept(e.token, emit):
                    continue
            else:
                run = self.speculator.accept(e.row, e.logits, e.draft, e.row.rng, emit)
                e.token, e.row.length = run.token, e.row.length + run.drafts
                if not run.complete:
                    continue
            ended.append(i)
            result = e.row.finish(emit)
            if on_finish:
                on_finish(e.key, result)
            self._remember(i, e)  # after the answer is out; before compaction reuses the cache row
        self._compact(ended)
        if not self.entries:
            self._release()  # idle: free the cache
            return
        self._advance()

    def abandon(self) -> list[tuple[Hashable, Row]]:
        """Drop every row (after a backend failure); returns them so the caller can fail their requests."""
        out = [(e.key, e.row) for e in self.entries]
        self.entries = []
        self._release()
        return out

    # ---- one step ---------------------------------------------------------------------------------

    def _advance(self) -> None:
        entries, n = self.entries, len(self.entries)
        live = [e for e in entries if e.filled is None]
        if self.speculator is not None and live:
            drafts = self.speculator.propose([e.row for e in live], [e.row.length for e in live])
            for e, draft in zip(live, drafts):
                e.draft = draft
        chunk = self._chunk(n, bool(live))
        chunks, lengths = [], np.empty(n, dtype=np.int64)
        for i, e in enumerate(entries):
            if e.filled is None:
                chunks.append([e.token, *(e.draft.tokens if e.draft is not None else ())])
                lengths[i] = e.row.length
            else:
                chunks.append(e.row.result.prompt_ids[e.filled:e.filled + chunk])
                lengths[i] = e.filled
        self.cache.fit(int(max(n_ + len(c) for n_, c in zip(lengths, chunks))))  # grows, or shrinks after long rows left
        view = self._view(0, n)
        if len(live) == n and all(len(c) == 1 for c in chunks):
            logits = self.gen.decode_one(view, np.array([c[0] for c in chunks], dtype=np.int64), lengths)[:, None]
        elif any(e.draft is not None for e in live):
            logits = self.gen.verify(view, chunks, lengths)
        else:
            logits = self.gen.extend(view, chunks, lengths)[:, None]
        for i, (e, c) in enumerate(zip(entries, chunks)):
            if e.filled is None:
                e.logits = logits[i, :len(c)]
                e.row.length += 1
                continue
            e.filled += len(c)
            if e.filled == len(e.row.result.prompt_ids):
                e.logits, e.filled = logits[i, min(len(c), logits.shape[1]) - 1][None], None

    def _chunk(self, n: int, running: bool) -> int:
        """Prompt tokens a row in prefill feeds this step: all of them with no live row to hold up, else
        its share of `prefill_chunk` positions (the step pads every row to the widest)."""
        if not running or not self.prefill_chunk:
            return self.gen.max_seq_len
        return max(1, self.prefill_chunk // n)

    # ---- prefix cache -------------------------------------------------------------------------------

    def _reuse(self, row: int, prompt: Sequence[int]) -> int:
        """Copy the longest cached prefix of `prompt` into cache row `row`; returns its length (0: none)."""
        if self.prefix_cache is None or len(prompt) > self.gen.exact_until:
            return 0
        hit = self.prefix_cache.lookup(prompt)
        if hit is None:
            return 0
        source, reuse = hit
        self.cache.copy_rows_from(source, 0, row, reuse)
        return reuse

    def _remember(self, i: int, e: _Entry) -> None:
        """Offer a finished row's keys/values to the prefix cache (before its cache row is reused)."""
        n = e.row.length
        if self.prefix_cache is None or e.filled is not None or n > self.gen.exact_until:
            return
        self.prefix_cache.insert(e.row.history[:n], lambda: self.cache.snapshot(i, n))

    # ---- cache rows ---------------------------------------------------------------------------------

    def _release(self) -> None:
        self.cache, self._views = None, {}

    def _compact(self, ended: list[int]) -> None:
        """Remove ended rows, moving the last rows (cache rows included) into their places."""
        if not ended:
            return
        n, m = len(self.entries), len(self.entries) - len(ended)
        gone = set(ended)
        holes = [i for i in ended if i < m]
        movers = [j for j in range(m, n) if j not in gone]
        for h, j in zip(holes, movers):
            self.cache.move_row(j, h)
            self.entries[h] = self.entries[j]
        del self.entries[m:]

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
