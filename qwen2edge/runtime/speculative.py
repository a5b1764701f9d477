"""Speculative decoding: cheap draft tokens, checked by the target model several at a time.

A batch-1 decode step on a CPU reads every weight once to produce one token; a verify step
(`Generator.verify`) feeds a row's next token and its K draft tokens at positions length..length+K in
one step, for little more than that one read, and yields the target's logits after each of them.
`Speculator.accept` then walks the drafts:

- greedy rows keep a draft while it equals the target's own pick (the pick plain decoding would make:
  grammar, logit_bias, min_tokens and penalties included), so the output is plain greedy's, token for token;
- sampled rows use speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft d,
  drawn from q, is accepted with probability min(1, p(d) / q(d)), and the first rejected one is replaced
  by a draw from max(p - q, 0), normalized; every emitted token is then distributed as the target's p.
  Prompt lookup proposes deterministically (q is one-hot on d). p is the row's processed distribution
  (`Row.scores`), so grammars, logit_bias and penalties hold for sampled rows too.

Drafts are checked one at a time through the row's own state (`Row.accept` after each), so a penalty
count, a grammar's state or min_tokens' ban at draft i is what it would be after plain decoding's first
i tokens; log-probabilities are recorded from the target's raw logits at each accepted position.

Either way at least one token comes out of every step (the target's pick after the last accepted
draft), and only accepted tokens advance the row's cache length: a rejected draft's keys sit past
it, masked, until a later step overwrites them. Rows decide alone what to draft: a row whose recent
drafts were mostly rejected pauses speculation (doubling pauses), so low acceptance falls back to plain
decoding on its own; the rule uses acceptance counts only, never timings, so sampled runs stay
reproducible with a seed.

Proposers: `PromptLookup` (the latest earlier occurrence of the text's last n-gram, in the prompt
or the text so far, and what followed it) and `runtime/draft.DraftModel` (a smaller bundle with the
same tokenizer).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np

from ..errors import InputError
from .generator import Generator, Row
from .sampling import draw, probabilities

METHODS = ("prompt-lookup", "draft")
WINDOW = 4  # verify steps with drafts whose acceptance decides whether a row keeps speculating
MIN_ACCEPTED = 0.5  # mean accepted drafts per verify step below which a row pauses (a verify costs more)
FIRST_PAUSE, MAX_PAUSE = 8, 256  # steps of plain decoding after a poor window; doubles while it stays poor


@dataclass(frozen=True)
class SpeculativeConfig:
    """What `--speculative` / `--draft` asked for."""

    method: str = "prompt-lookup"
    num_tokens: int = 5  # K: draft tokens per step
    ngram: int = 3  # prompt lookup: longest n-gram matched (shorter ones are tried after it)
    draft: str | None = None  # draft bundle directory (method "draft")

    def check(self) -> "SpeculativeConfig":
        """Raise InputError naming the option for the first bad value; returns self."""
        if self.method not in METHODS:
            raise InputError(f"unknown speculative method {self.method!r}: set {{opt:speculative}} to "
                             f"{' or '.join(METHODS)}")
        if not 1 <= self.num_tokens <= 32:
            raise InputError(f"{{opt:num_speculative_tokens}} must be in 1..32, got {self.num_tokens}: 4 to 8 "
                             "suits most models")
        if not 1 <= self.ngram <= 16:
            raise InputError(f"{{opt:ngram}} must be in 1..16, got {self.ngram}: 2 or 3 is usual")
        if self.method == "draft" and not self.draft:
            raise InputError("speculative method 'draft' needs a draft bundle: pass {opt:draft} DRAFT_BUNDLE")
        if self.method != "draft" and self.draft:
            raise InputError(f"{{opt:draft}} is for the draft method, not {self.method!r}: drop one of "
                             "{opt:draft} and {opt:speculative}")
        return self


@dataclass
class Draft:
    """A row's draft tokens and, from a draft model, the distribution each was drawn from."""

    tokens: list[int]
    q: list[np.ndarray] | None = None  # [V] per token; None: proposed deterministically (one-hot)


class Accepted(NamedTuple):
    token: int  # the last token accepted: the next step feeds it
    drafts: int  # drafts accepted (their keys are in the cache already)
    tokens: int  # tokens accepted by this call
    complete: bool  # the row ended (stop id or string, max_new_tokens)


RngOf = Callable[[Row], np.random.Generator | None]


class Proposer(Protocol):
    name: str

    def propose(self, rows: Sequence[Row], budgets: Sequence[int], rng_of: RngOf) -> list[Draft | None]:
        """Up to budgets[i] draft tokens for rows[i] (whose history ends with the token fed next)."""


class _RowState:
    """What speculation keeps per row: the n-gram index and the fallback controller."""

    def __init__(self, ngram: int):
        self.index = NgramIndex(ngram)
        self.window: collections.deque[int] = collections.deque(maxlen=WINDOW)
        self.pause = 0
        self.next_pause = FIRST_PAUSE

    def record(self, accepted: int) -> None:
        self.window.append(accepted)
        if len(self.window) < WINDOW:
            return
        if sum(self.window) < MIN_ACCEPTED * WINDOW:
            self.pause, self.next_pause = self.next_pause, min(2 * self.next_pause, MAX_PAUSE)
        else:
            self.next_pause = FIRST_PAUSE
        self.window.clear()


class Speculator:
    """Drafts for the rows of one batch, and the acceptance of what a verify step returned.

    One per batch (a draft model keeps a cache per batch); build them with `speculator_factory`."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer, target: Generator):
        self.config = config
        self.proposer = proposer
        self.method = proposer.name
        # A verify step's last slot must stay in the cache and where multi-token steps are exact.
        self.limit = min(target.max_seq_len, target.exact_until)

    def state(self, row: Row) -> _RowState:
        if row.spec is None:
            row.spec = _RowState(self.config.ngram)
        return row.spec

    def budget(self, row: Row, length: int) -> int:
        """Drafts row may verify now: its next token goes to slot `length`, drafts after it; none while
        paused, none that could not be accepted (max_new_tokens) or would leave the exact range."""
        st = self.state(row)
        if st.pause > 0:
            st.pause -= 1
            return 0
        remaining = row.params.max_new_tokens - len(row.result.token_ids) - 1
        return max(0, min(self.config.num_tokens, remaining, self.limit - length - 1))

    def propose(self, rows: Sequence[Row], lengths: Sequence[int],
                shared_rng: np.random.Generator | None = None) -> list[Draft | None]:
        """Drafts for live rows whose next token goes to slot lengths[i] (None: plain step for that row)."""
        budgets = [self.budget(row, int(n)) for row, n in zip(rows, lengths)]
        if not any(budgets):
            return [None] * len(rows)
        drafts = self.proposer.propose(rows, budgets, lambda row: row.rng or shared_rng)
        out: list[Draft | None] = []
        for draft, k in zip(drafts, budgets):
            if draft is None or not draft.tokens or k == 0:
                out.append(None)
            else:
                out.append(Draft(draft.tokens[:k], draft.q[:k] if draft.q is not None else None))
        return out

    def accept(self, row: Row, logits: np.ndarray, draft: Draft | None, rng: np.random.Generator | None,
               on_text: Callable[[str], None] | None) -> Accepted:
        """Accept row's drafts the target agrees with, then the target's own next token; `logits` [T, V]
        follow the fed token and each draft. Every accepted token goes through `row.accept` (stop ids,
        stop strings and max_new_tokens inside an accepted run end the row there)."""
        drafts = draft.tokens if draft is not None else []
        taken = 0
        for i, d in enumerate(drafts):
            tok = self._check(row, logits[i:i + 1], d, draft.q[i] if draft.q is not None else None, rng)
            agreed = tok == d
            taken += agreed
            complete = row.accept(tok, on_text)
            if complete or not agreed:  # a replacement token ends the run: the next step feeds it
                return self._done(row, draft, taken, tok, i + 1, complete)
        tok = self._pick(row, logits[len(drafts):len(drafts) + 1], rng)
        return self._done(row, draft, taken, tok, len(drafts) + 1, row.accept(tok, on_text))

    # ---- acceptance --------------------------------------------------------------------------------

    def _done(self, row: Row, draft: Draft | None, taken: int, tok: int, tokens: int, complete: bool) -> Accepted:
        if draft is not None:
            row.result.drafted += len(draft.tokens)
            row.result.accepted += taken
            self.state(row).record(taken)
        return Accepted(tok, taken, tokens, complete)

    @staticmethod
    def _pick(row: Row, logits: np.ndarray, rng: np.random.Generator | None) -> int:
        """The token plain decoding would pick from logits [1, V] (the row's own sampler when it has one),
        through the row's whole chain: grammar, logit_bias, min_tokens, penalties, logprobs."""
        return row.sample(logits, rng)

    def _check(self, row: Row, logits: np.ndarray, d: int, q: np.ndarray | None,
               rng: np.random.Generator | None) -> int:
        """d when the target accepts it at this position, else the token to emit instead."""
        if row.params.greedy:
            return self._pick(row, logits, rng)
        replacement = rejection_step(target_probs(row, logits), q, d, rng)
        tok = d if replacement is None else replacement
        row.record(logits, tok)
        return tok


def target_probs(row: Row, logits: np.ndarray) -> np.ndarray:
    """The target's distribution [V] for row's next token from logits [1, V], as its sampler sees it (the
    row's state is that of the tokens accepted so far, so penalties and grammar apply exactly)."""
    return probabilities(row.scores(logits), row.params)[0]


def rejection_step(p: np.ndarray, q: np.ndarray | None, d: int, rng: np.random.Generator) -> int | None:
    """One step of speculative rejection sampling for draft token d ~ q (q None: d proposed with certainty)
    against the target's p: None when d is accepted, else the replacement drawn from max(p - q, 0)."""
    qd = 1.0 if q is None else float(q[d])
    if rng.random() * qd < p[d]:  # u < p(d) / q(d), u uniform in [0, 1)
        return None
    residual = p.copy()
    if q is None:
        residual[d] = 0.0
    else:
        residual = np.maximum(residual - q, 0.0)
    if residual.sum() <= 0:  # p == q: the draw above always accepts; kept for rounding's sake
        residual = p
    return int(draw(residual[None, :], rng)[0])


# ---- prompt lookup -----------------------------------------------------------------------------------

class NgramIndex:
    """Where each n-gram (n = 1..N) of a row's history last ended, excluding the history's own suffix;
    built incrementally as the history grows."""

    def __init__(self, n: int):
        self.n = n
        self.last: list[dict[tuple[int, ...], int]] = [{} for _ in range(n + 1)]
        self.indexed = 0  # n-grams ending before this position are indexed

    def continuation(self, history: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        end = len(history) - 1  # the suffix ends here; index n-grams ending before it
        for pos in range(self.indexed, end):
            for n in range(1, min(self.n, pos + 1) + 1):
                self.last[n][tuple(history[pos - n + 1:pos + 1])] = pos
        self.indexed = max(self.indexed, end)
        for n in range(min(self.n, len(history)), 0, -1):
            at = self.last[n].get(tuple(history[len(history) - n:]))
            if at is not None:
                return list(history[at + 1:at + 1 + k])
        return []


class PromptLookup:
    """Drafts copied from the prompt or the text so far (Saxena 2023, 'prompt lookup decoding'): what
    followed the latest earlier occurrence of the last n-gram. Free: no model runs."""

    name = "prompt-lookup"

    def __init__(self, ngram: int):
        self.ngram = ngram

    def propose(self, rows: Sequence[Row], budgets: Sequence[int], rng_of: RngOf) -> list[Draft | None]:
        out: list[Draft | None] = []
        for row, k in zip(rows, budgets):
            tokens = row.spec.index.continuation(row.history, k) if k else []
            out.append(Draft(tokens) if tokens else None)
        return out


def speculator_factory(config: SpeculativeConfig | None, bundle, target: Generator,
                       backend: str = "ort") -> Callable[[], Speculator] | None:
    """A maker of per-batch speculators for `target` (None when `config` is None). A draft bundle is opened,
    checked against the target's vocabulary and loaded once; each speculator keeps its own draft cache."""
    if config is None:
        return None
    config.check()
    if config.method == "prompt-lookup":
        return lambda: Speculator(config, PromptLookup(config.ngram), target)
    from .draft import DraftModel, open_draft

    draft_gen = open_draft(config.draft, bundle, backend)
    return lambda: Speculator(config, DraftModel(draft_gen), target)
