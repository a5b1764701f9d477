"""Per-row logits processing before sampling, and log-probabilities after it (numpy only).

Log-probabilities are the model's own: a log-softmax over the raw logits of the step, before the
grammar mask, penalties, bias, temperature or top-k/top-p touch them (vLLM's default "raw logprobs").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection, Sequence

import numpy as np

from ..errors import InputError
from .sampling import SamplingParams, apply_repetition_penalty

if TYPE_CHECKING:
    from .constrain import Constraint


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and, best first, the `n` most likely tokens at its position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis (float64: a 150k-token normalizer summed in float32 loses
    digits the 2e-3 agreement with transformers needs)."""
    x = np.asarray(logits, dtype=np.float64)
    peak = x.max(axis=-1, keepdims=True)
    return x - (peak + np.log(np.exp(x - peak).sum(axis=-1, keepdims=True)))


def top_logprobs(logprobs: np.ndarray, n: int) -> tuple[tuple[int, float], ...]:
    """The n most likely (token, logprob) of one position, best first (ties: lower id first)."""
    if n <= 0:
        return ()
    n = min(n, logprobs.size)
    idx = np.argpartition(-logprobs, n - 1)[:n]
    idx = idx[np.lexsort((idx, -logprobs[idx]))]
    return tuple((int(i), float(logprobs[i])) for i in idx)


def token_logprob(logits: np.ndarray, token: int, n: int) -> TokenLogprob:
    """`token`'s log-probability under one position's raw logits [V], with the n best alternatives."""
    lp = log_softmax(logits)
    return TokenLogprob(int(token), float(lp[token]), top_logprobs(lp, n))


class RowLogits:
    """One row's chain before sampling: the grammar mask, logit_bias, min_tokens' ban on the stop ids,
    then the repetition, frequency and presence penalties (vLLM's order).

    OpenAI's penalties count the row's generated tokens: logit[j] -= count[j] * frequency_penalty +
    (count[j] > 0) * presence_penalty. A row that asks for none of it gets its logits back untouched."""

    def __init__(self, params: SamplingParams, stop_ids: Collection[int], constraint: "Constraint | None" = None):
        self.params = params
        self.constraint = constraint
        self.ban = np.array(sorted(stop_ids), dtype=np.int64) if params.min_tokens else None
        self.bias_ids = np.array([t for t, _ in params.logit_bias], dtype=np.int64)
        self.bias = np.array([b for _, b in params.logit_bias], dtype=np.float32)
        self.counts: Counter[int] = Counter()
        self.penalized = bool(params.frequency_penalty or params.presence_penalty)
        self.active = (constraint is not None or self.bias_ids.size > 0 or self.ban is not None or self.penalized
                       or params.repetition_penalty != 1.0)

    def process(self, logits: np.ndarray, history: Sequence[int], generated: int) -> np.ndarray:
        """The logits [1, V] to sample from, given the row's ids so far and how many it generated."""
        if not self.active:
            return logits
        vocab = logits.shape[-1]
        out = self.constraint.mask(logits) if self.constraint is not None else logits.copy()
        if self.bias_ids.size:
            if self.bias_ids.max() >= vocab:
                raise InputError(f"logit_bias names token {int(self.bias_ids.max())}, outside the vocabulary "
                                 f"(0..{vocab - 1}): fix {{opt:logit_bias}}")
            np.add.at(out[0], self.bias_ids, self.bias)
        if self.ban is not None and generated < self.params.min_tokens:
            ban = self.ban[self.ban < vocab]
            kept = out[0, ban].copy()
            out[0, ban] = -np.inf
            if self.constraint is not None and not np.isfinite(out).any():
                out[0, ban] = kept  # the grammar allows nothing but ending: it wins over min_tokens
        if self.params.repetition_penalty != 1.0:
            out = apply_repetition_penalty(out, [history], self.params.repetition_penalty)
        if self.penalized and self.counts:
            ids = np.fromiter(self.counts.keys(), dtype=np.int64, count=len(self.counts))
            n = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
            out[0, ids] -= n * self.params.frequency_penalty + (n > 0) * self.params.presence_penalty
        return out

    def observe(self, token: int) -> None:
        """Record a generated token (penalty counts, grammar state)."""
        if self.penalized:
            self.counts[token] += 1
        if self.constraint is not None:
            self.constraint.consume(token)

    @property
    def grammar_done(self) -> bool:
        """The row's grammar is complete: nothing but ending can follow."""
        return self.constraint is not None and self.constraint.done
