"""Prompt log-probabilities (OpenAI's `echo` + `logprobs`): each prompt token's log-probability given the
tokens before it, from the model's raw logits.

A pass of its own over a one-row cache, in chunks: the graph returns logits for every position of a
chunk (`logits_index`), and a chunk of C tokens costs C x vocab floats (150k-token vocabularies make a
whole long prompt's logits gigabytes). Chunks after the first attend the cache the earlier ones wrote.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from .. import io_spec
from .logits import TokenLogprob, log_softmax, top_logprobs

if TYPE_CHECKING:
    from .generator import Generator

SCORE_CHUNK = 64  # prompt tokens per step: 64 x 151,646 float32 logits = 39 MB


def chunk_feed(ids: Sequence[int], start: int, cache_len: int) -> dict[str, np.ndarray]:
    """Inputs for tokens `ids` at positions start.. over a cache of `cache_len` slots whose first `start`
    are filled, with logits at every position."""
    t = len(ids)
    mask = np.zeros((1, cache_len + t), dtype=np.int64)
    mask[0, :start] = 1
    mask[0, cache_len:] = 1
    return {
        io_spec.INPUT_IDS: np.asarray([ids], dtype=np.int64),
        io_spec.POSITION_IDS: np.arange(start, start + t, dtype=np.int64)[None, :],
        io_spec.ATTENTION_MASK: mask,
        io_spec.LOGITS_INDEX: np.arange(t, dtype=np.int64)[None, :],
    }


def prompt_logprobs(gen: "Generator", ids: Sequence[int], top_n: int,
                    chunk: int = SCORE_CHUNK) -> list[TokenLogprob | None]:
    """One entry per prompt token: None for the first (nothing predicts it), then its log-probability
    given the tokens before it and the `top_n` most likely tokens at its position."""
    ids = [int(i) for i in ids]
    out: list[TokenLogprob | None] = [None]
    cache = gen.new_cache(1, min(len(ids), chunk))
    for start in range(0, len(ids) - 1, chunk):  # the last token predicts nothing in the prompt
        piece = ids[start:start + chunk]
        capacity = cache.reserve(start + len(piece))
        logits = gen.step(cache, chunk_feed(piece, start, capacity), np.array([start], dtype=np.int64))[0]
        for j in range(len(piece)):
            nxt = start + j + 1
            if nxt < len(ids):
                lp = log_softmax(logits[j])
                out.append(TokenLogprob(ids[nxt], float(lp[ids[nxt]]), top_logprobs(lp, top_n)))
    return out
