"""A draft bundle as speculative proposer: a smaller model with the target's tokenizer guesses K tokens.

The draft keeps a cache of its own, one row per target row it drafts for (rows are known by identity,
so the static batch and the in-flight batch drive it alike). Each call catches every row up on the
tokens its cache has not seen (the row's history: what the target accepted since, including the token
fed next), then runs K - 1 one-token steps; the last draft's keys are never needed. Rejected drafts
stay past the row's valid prefix, which is recomputed from the history on the next call.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InputError
from .generator import Generator, Row
from .kv_cache import KVCache
from .sampling import draw, probabilities
from .speculative import Draft, RngOf


def open_draft(path: str, target_bundle, backend: str = "ort") -> Generator:
    """The draft bundle's generator, refused in one line when its vocabulary is not the target's."""
    from .bundle import Bundle

    draft = Bundle.open(path)
    ours, theirs = target_bundle.config.vocab_size, draft.config.vocab_size
    if ours != theirs or not draft.tokenizer.same_vocabulary(target_bundle.tokenizer):
        what = f"{theirs} logits vs the target's {ours}" if ours != theirs else "a different tokenizer"
        raise InputError(f"the draft bundle {path} does not share the target's vocabulary ({what}): pass a "
                         "{opt:draft} exported from a model with the target's tokenizer")
    return draft.generator(backend)


class DraftModel:
    """Proposes with a draft generator; one instance per batch (it owns a draft cache)."""

    name = "draft"

    def __init__(self, gen: Generator):
        self.gen = gen
        self.cache: KVCache | None = None
        self.rows: list[Row] = []  # draft cache row i drafts for rows[i]
        self.fed: list[list[int]] = []  # tokens whose keys are in draft cache row i, slots [0, len)

    def propose(self, rows: Sequence[Row], budgets: Sequence[int], rng_of: RngOf) -> list[Draft | None]:
        fits = [k > 0 and len(row.history) + k <= self.gen.max_seq_len for row, k in zip(rows, budgets)]
        active = [row for row, ok in zip(rows, fits) if ok]
        out: list[Draft | None] = [None] * len(rows)
        if not active:
            self._release()
            return out
        old = self._sync(active)
        k_of = {id(row): k for row, k in zip(rows, budgets)}
        drafts = self._draft([k_of[id(row)] for row in self.rows], old, rng_of)
        at = {id(row): i for i, row in enumerate(self.rows)}
        for i, (row, ok) in enumerate(zip(rows, fits)):
            if ok:
                out[i] = drafts[at[id(row)]]
        return out

    def _sync(self, active: list[Row]) -> int:
        """Make the draft rows exactly `active` (dropping the others, last rows moved into their holes),
        new rows appended with nothing fed; returns how many rows were there before."""
        keep = {id(row) for row in active}
        i = 0
        while i < len(self.rows):
            if id(self.rows[i]) in keep:
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:
                self.cache.move_row(last, i)
                self.rows[i], self.fed[i] = self.rows[last], self.fed[last]
            del self.rows[last], self.fed[last]
        known, old = {id(row) for row in self.rows}, len(self.rows)
        for row in active:
            if id(row) not in known:
                self.rows.append(row)
                self.fed.append([])
        return old

    def _draft(self, ks: list[int], old: int, rng_of: RngOf) -> list[Draft]:
        n, kmax = len(self.rows), max(ks)
        histories = [row.history for row in self.rows]
        # At least the last token is fed again: its logits give the first draft.
        valid = [min(_common_prefix(fed, hist), len(hist) - 1) for fed, hist in zip(self.fed, histories)]
        longest = max(len(h) + k for h, k in zip(histories, ks))
        if self.cache is None:
            self.cache = self.gen.new_cache(n, longest)
        self.cache.reserve_rows(n, n)
        self.cache.reserve(longest)  # on the whole cache: views do not grow
        # Catch up: rows seen before feed a few tokens, new rows their whole history (apart, so the short
        # rows are not padded to a prompt's length).
        logits = np.concatenate([
            self.gen.extend(self.cache.view(a, b), [h[v:] for h, v in zip(histories[a:b], valid[a:b])], valid[a:b])
            for a, b in ((0, old), (old, n)) if b > a])
        tokens: list[list[int]] = [[] for _ in range(n)]
        dists: list[list[np.ndarray]] = [[] for _ in range(n)]
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        view = self.cache.view(0, n)
        for step in range(kmax):
            nxt = np.empty(n, dtype=np.int64)
            for i, row in enumerate(self.rows):
                nxt[i] = self._pick(row, logits[i:i + 1], rng_of(row), dists[i])
                tokens[i].append(int(nxt[i]))
            if step < kmax - 1:  # rows past their own budget feed nothing (their slots may end sooner)
                logits = self.gen.extend(view, [[int(t)] if step < k - 1 else [] for t, k in zip(nxt, ks)],
                                         lengths + step)
        self.fed = [list(h) + t[:kmax - 1] for h, t in zip(histories, tokens)]
        return [Draft(t[:k], d[:k] if d else None) for t, d, k in zip(tokens, dists, ks)]

    @staticmethod
    def _pick(row: Row, logits: np.ndarray, rng: np.random.Generator | None, dists: list[np.ndarray]) -> int:
        """Greedy rows: the draft's argmax. Sampled rows: a draw from the draft's distribution under the
        row's temperature / top-k / top-p, kept for the rejection step."""
        if row.params.greedy or rng is None:
            return int(np.argmax(logits[0]))
        q = probabilities(logits, row.params)
        dists.append(q[0])
        return int(draw(q, rng)[0])

    def _release(self) -> None:
        self.cache, self.rows, self.fed = None, [], []


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n
