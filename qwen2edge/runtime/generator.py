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
from .backend import Backend, cache_capacity
from .sampling import SamplingParams, make_rng, sample_next
from .tokenizer import StopMatcher, StreamDecoder

OnText = Callable[[int, str], None]  # (row, text delta)
ShouldStop = Callable[[int], bool]  # (row) -> stop this row now


@dataclass
class Generation:
    """One row's result."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (eos id or stop string) | "length" | "cancelled"


OnFinish = Callable[[int, Generation], None]  # (row, its complete result)


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


def prefill_feed(prompts: Sequence[Sequence[int]], cache_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Inputs for the first step: right-padded prompts, empty cache of `cache_len` slots (the cache's
    capacity), logits at each row's last token."""
    b, t = len(prompts), max(len(p) for p in prompts)
    ids = np.full((b, t), pad_id, dtype=np.int64)
    mask = np.zeros((b, cache_len + t), dtype=np.int64)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = p
        mask[r, cache_len:cache_len + len(p)] = 1
    return {
        io_spec.INPUT_IDS: ids,
        io_spec.POSITION_IDS: np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy(),
        io_spec.ATTENTION_MASK: mask,
        io_spec.LOGITS_INDEX: np.array([[len(p) - 1] for p in prompts], dtype=np.int64),
    }


def decode_feed(tokens: np.ndarray, lengths: np.ndarray, cache_len: int) -> dict[str, np.ndarray]:
    """Inputs for one decode step over a cache of `cache_len` slots: each row's token at position
    lengths[b], slots [0, lengths[b]) valid."""
    b = tokens.shape[0]
    mask = np.zeros((b, cache_len + 1), dtype=np.int64)
    mask[:, :cache_len] = np.arange(cache_len)[None, :] < lengths[:, None]
    mask[:, cache_len] = 1
    return {
        io_spec.INPUT_IDS: tokens.reshape(b, 1).astype(np.int64),
        io_spec.POSITION_IDS: lengths.reshape(b, 1).astype(np.int64),
        io_spec.ATTENTION_MASK: mask,
        io_spec.LOGITS_INDEX: np.zeros((b, 1), dtype=np.int64),
    }


class Row:
    """One sequence's decoding state: its sampler, stop rules, streaming text and result.

    Shared by the static batch of `Generator.generate` and the in-flight batch of
    `runtime.continuous`, so both stop, stream and finish a sequence the same way."""

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, default_stop_ids: Sequence[int],
                 tokenizer, rng: np.random.Generator | None):
        self.result = Generation(prompt_ids=list(map(int, prompt_ids)))
        self.params = params
        self.stop_ids = set(params.stop_token_ids or default_stop_ids)
        self.rng = rng  # None when the batch samples all rows with one shared generator
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.matcher = StopMatcher(params.stop_strings)
        self.history = list(self.result.prompt_ids)
        self.length = len(self.result.prompt_ids)  # cache slots filled
        self.done = False

    def sample(self, logits: np.ndarray) -> int:
        """The next token from this row's logits [1, V] with its own sampler."""
        prev = [self.history] if self.params.repetition_penalty != 1.0 else None
        return int(sample_next(logits, self.params, self.rng, prev)[0])

    def accept(self, tok: int, on_text: Callable[[str], None] | None) -> bool:
        """Take a sampled token; returns True when the row is complete (then call `finish`)."""
        if tok in self.stop_ids:
            self.result.finish_reason = "stop"
            return True
        self.result.token_ids.append(tok)
        self.history.append(tok)
        if self.decoder is not None:
            self._emit(self.decoder.push(tok), on_text)
        return self.done or len(self.result.token_ids) >= self.params.max_new_tokens

    def cancel(self) -> None:
        self.result.finish_reason = "cancelled"

    def finish(self, on_text: Callable[[str], None] | None) -> Generation:
        """Mark the row done and flush its held-back text (so a stream ends without waiting for others)."""
        self.done = True
        if self.decoder is not None and not self.matcher.stopped:
            self._emit(self.decoder.flush(), on_text)
            tail = self.matcher.flush()
            if tail:
                self.result.text += tail
                if on_text:
                    on_text(tail)
        return self.result

    def _emit(self, delta: str, on_text: Callable[[str], None] | None) -> None:
        if not delta:
            return
        safe, hit = self.matcher.feed(delta)
        if safe:
            self.result.text += safe
            if on_text:
                on_text(safe)
        if hit:
            self.done, self.result.finish_reason = True, "stop"


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

    def step(self, cache, feed: dict[str, np.ndarray], positions_start: np.ndarray) -> np.ndarray:
        """One backend step with the host-side extra inputs (DCA) added; returns logits [B, N, V]."""
        if self.extra_feed is not None:
            feed = {**feed, **self.extra_feed(feed, positions_start)}
        return self.backend.step(cache, feed, positions_start)

    def new_row(self, prompt_ids: Sequence[int], params: SamplingParams) -> Row:
        """A row with its own seeded sampler, checked to fit the cache."""
        check_fits([len(prompt_ids)], params.max_new_tokens, self.max_seq_len)
        return Row(prompt_ids, params, self.default_stop_ids, self.tokenizer, make_rng(params.seed))

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 on_text: OnText | None = None, *, should_stop: ShouldStop | None = None,
                 on_finish: OnFinish | None = None) -> tuple[list[Generation], Timings]:
        """Generate for a batch of token-id prompts; `on_text(row, delta)` streams text.

        `params` is one SamplingParams for every row, or one per row (then each row samples with its own
        seeded generator, so a row's output does not depend on what it is batched with). A row stops
        early when `should_stop(row)` turns true (finish_reason "cancelled"); `on_finish(row, result)`
        fires as soon as a row is complete, before slower rows in the batch are.
        """
        prompts = [list(map(int, p)) for p in prompts]
        b = len(prompts)
        per_row = not isinstance(params, SamplingParams)
        plist = list(params) if per_row else [params] * b
        if len(plist) != b:
            raise InputError(f"got {len(plist)} SamplingParams for {b} prompts: pass one per prompt or a single one")
        if per_row:
            rows = [self.new_row(p, rp) for p, rp in zip(prompts, plist)]
            shared_rng = None
        else:
            check_fits([len(p) for p in prompts], params.max_new_tokens, self.max_seq_len)
            rows = [Row(p, params, self.default_stop_ids, self.tokenizer, None) for p in prompts]
            shared_rng = make_rng(params.seed)
        max_steps = max(rp.max_new_tokens for rp in plist)
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        timings = Timings()

        def finish(r: int) -> None:
            rows[r].finish((lambda d: on_text(r, d)) if on_text else None)
            if on_finish:
                on_finish(r, rows[r].result)

        # The cache starts at the smallest bucket that holds the prompts and their first new token, and
        # grows with the sequence: a step attends every slot it is handed.
        longest = int(lengths.max())
        cache = self.backend.new_cache(b, capacity=cache_capacity(longest + 1, 0, self.max_seq_len))
        t0 = time.perf_counter()
        cap = self.backend.reserve(cache, longest)
        logits = self.step(cache, prefill_feed(prompts, cap, self.pad_id), np.zeros(b, dtype=np.int64))
        timings.prefill_s = time.perf_counter() - t0
        t_dec = time.perf_counter()
        for step in range(max_steps):
            if should_stop is not None:
                for r in range(b):
                    if not rows[r].done and should_stop(r):
                        rows[r].cancel()
                        finish(r)
                if all(row.done for row in rows):
                    break
            nxt = self._sample(logits[:, -1, :], rows, shared_rng)
            for r, row in enumerate(rows):
                if row.done:
                    continue
                tok = int(nxt[r])
                timings.new_tokens += tok not in row.stop_ids
                if row.accept(tok, (lambda d, r=r: on_text(r, d)) if on_text else None):
                    finish(r)
            if all(row.done for row in rows) or step == max_steps - 1:
                break
            # Finished rows keep their write position: they are still computed (the batch shape is
            # static) but never advance past the slots their own request was checked to fit in.
            live = np.array([not row.done for row in rows])
            cap = self.backend.reserve(cache, int(lengths.max()) + 1)
            logits = self.step(cache, decode_feed(nxt, lengths, cap), lengths)
            lengths = lengths + live
            timings.decode_steps += 1
        timings.decode_s = time.perf_counter() - t_dec
        for r, row in enumerate(rows):
            if not row.done:
                finish(r)
        return [row.result for row in rows], timings

    def _sample(self, logits: np.ndarray, rows: list[Row], shared_rng: np.random.Generator | None) -> np.ndarray:
        if shared_rng is not None:
            params = rows[0].params
            history = [row.history for row in rows] if params.repetition_penalty != 1.0 else None
            return sample_next(logits, params, shared_rng, history)
        nxt = np.full(len(rows), self.pad_id, dtype=np.int64)
        for r, row in enumerate(rows):
            if not row.done:
                nxt[r] = row.sample(logits[r:r + 1])
        return nxt
