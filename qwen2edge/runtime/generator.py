"""Prefill-then-decode over the static KV cache; backend-agnostic.

Batches are right-padded: row b's prompt occupies cache slots [0, len_b) and each new token is
written at the row's own next slot, so rows of different lengths never shift each other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .. import io_spec
from ..errors import InputError
from .backend import Backend
from .sampling import SamplingParams, make_rng, sample_next
from .tokenizer import StopMatcher, StreamDecoder

OnText = Callable[[int, str], None]  # (row, text delta)


@dataclass
class Generation:
    """One row's result."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (eos id or stop string) | "length"


@dataclass
class Timings:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    new_tokens: int = 0
    decode_steps: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {"prefill_s": round(self.prefill_s, 4), "decode_s": round(self.decode_s, 4),
                "ttft_s": round(self.prefill_s, 4), "new_tokens": self.new_tokens,
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 2)}


def check_fits(prompt_lens: Sequence[int], max_new_tokens: int, max_seq_len: int) -> None:
    """Refuse prompts that cannot fit the cache together with the requested new tokens."""
    if not prompt_lens or min(prompt_lens) < 1:
        raise InputError("empty prompt: give at least one token of input")
    longest = max(prompt_lens)
    if longest + max_new_tokens > max_seq_len:
        raise InputError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the bundle's max_seq_len "
            f"{max_seq_len}: shorten the prompt, lower --max-new-tokens, or re-export with a larger --max-seq-len"
        )


def prefill_feed(prompts: Sequence[Sequence[int]], max_seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Inputs for the first step: right-padded prompts, empty cache, logits at each row's last token."""
    b, t = len(prompts), max(len(p) for p in prompts)
    ids = np.full((b, t), pad_id, dtype=np.int64)
    mask = np.zeros((b, max_seq_len + t), dtype=np.int64)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = p
        mask[r, max_seq_len:max_seq_len + len(p)] = 1
    return {
        io_spec.INPUT_IDS: ids,
        io_spec.POSITION_IDS: np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy(),
        io_spec.ATTENTION_MASK: mask,
        io_spec.LOGITS_INDEX: np.array([[len(p) - 1] for p in prompts], dtype=np.int64),
    }


def decode_feed(tokens: np.ndarray, lengths: np.ndarray, max_seq_len: int) -> dict[str, np.ndarray]:
    """Inputs for one decode step: each row's token at position lengths[b], slots [0, lengths[b]) valid."""
    b = tokens.shape[0]
    mask = np.zeros((b, max_seq_len + 1), dtype=np.int64)
    mask[:, :max_seq_len] = np.arange(max_seq_len)[None, :] < lengths[:, None]
    mask[:, max_seq_len] = 1
    return {
        io_spec.INPUT_IDS: tokens.reshape(b, 1).astype(np.int64),
        io_spec.POSITION_IDS: lengths.reshape(b, 1).astype(np.int64),
        io_spec.ATTENTION_MASK: mask,
        io_spec.LOGITS_INDEX: np.zeros((b, 1), dtype=np.int64),
    }


class Generator:
    """Runs generation for one bundle's backend and tokenizer."""

    def __init__(self, backend: Backend, tokenizer, stop_token_ids: Sequence[int] = (),
                 extra_feed: Callable[[dict[str, np.ndarray], np.ndarray], dict[str, np.ndarray]] | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_seq_len = backend.spec.max_seq_len
        self.default_stop_ids = tuple(stop_token_ids)
        self.extra_feed = extra_feed  # e.g. DCA position indices computed on the host
        if backend.spec.dca and extra_feed is None:
            raise InputError("this bundle uses Dual Chunk Attention and needs its host-side inputs: pass "
                             "extra_feed=runtime.api.dca_feed_for(bundle) (runtime.api.load_generator does)")
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        self.pad_id = int(pad if pad is not None else (self.default_stop_ids or (0,))[0])

    def _step(self, cache, feed: dict[str, np.ndarray], positions_start: np.ndarray) -> np.ndarray:
        if self.extra_feed is not None:
            feed = {**feed, **self.extra_feed(feed, positions_start)}
        return self.backend.step(cache, feed, positions_start)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 on_text: OnText | None = None) -> tuple[list[Generation], Timings]:
        """Generate for a batch of token-id prompts; `on_text(row, delta)` streams text."""
        prompts = [list(map(int, p)) for p in prompts]
        check_fits([len(p) for p in prompts], params.max_new_tokens, self.max_seq_len)
        b = len(prompts)
        stop_ids = set(params.stop_token_ids or self.default_stop_ids)
        rng = make_rng(params.seed)
        results = [Generation(prompt_ids=p) for p in prompts]
        decoders = [StreamDecoder(self.tokenizer) if self.tokenizer is not None else None for _ in prompts]
        matchers = [StopMatcher(params.stop_strings) for _ in prompts]
        done = np.zeros(b, dtype=bool)
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        history = [list(p) for p in prompts]
        timings = Timings()

        cache = self.backend.new_cache(b)
        t0 = time.perf_counter()
        logits = self._step(cache, prefill_feed(prompts, self.max_seq_len, self.pad_id), np.zeros(b, dtype=np.int64))
        timings.prefill_s = time.perf_counter() - t0
        t_dec = time.perf_counter()
        for step in range(params.max_new_tokens):
            nxt = sample_next(logits[:, -1, :], params, rng, history if params.repetition_penalty != 1.0 else None)
            for r in range(b):
                if done[r]:
                    continue
                tok = int(nxt[r])
                if tok in stop_ids:
                    done[r], results[r].finish_reason = True, "stop"
                    continue
                results[r].token_ids.append(tok)
                history[r].append(tok)
                timings.new_tokens += 1
                if decoders[r] is not None:
                    self._emit(r, decoders[r].push(tok), results, matchers, done, on_text)
            if done.all() or step == params.max_new_tokens - 1:
                break
            logits = self._step(cache, decode_feed(nxt, lengths, self.max_seq_len), lengths)
            lengths = lengths + 1
            timings.decode_steps += 1
        timings.decode_s = time.perf_counter() - t_dec
        for r in range(b):
            if decoders[r] is not None and not matchers[r].stopped:
                self._emit(r, decoders[r].flush(), results, matchers, done, on_text)
                tail = matchers[r].flush()
                if tail:
                    results[r].text += tail
                    if on_text:
                        on_text(r, tail)
        return results, timings

    @staticmethod
    def _emit(r: int, delta: str, results, matchers, done, on_text) -> None:
        if not delta:
            return
        safe, hit = matchers[r].feed(delta)
        if safe:
            results[r].text += safe
            if on_text:
                on_text(r, safe)
        if hit:
            done[r], results[r].finish_reason = True, "stop"
