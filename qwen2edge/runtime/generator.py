"""Prefill, decode one, decode n over a backend's KV cache; backend-agnostic.

Batches are right-padded: row b's prompt occupies cache slots [0, len_b) and each new token is
written at the row's own next slot, so rows of different lengths never shift each other.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .. import io_spec
from ..errors import InputError, InternalError
from .backend import Backend
from .constrain import Constraint, GrammarEngine
from .kv_cache import CACHE_BUCKET, KVCache, cache_capacity
from .logits import RowLogits, TokenLogprob, token_logprob
from .sampling import SamplingParams, make_rng, sample_next
from .tokenizer import StopMatcher, StreamDecoder

OnText = Callable[[int, str], None]  # (row, text delta)
ShouldStop = Callable[[int], bool]  # (row) -> stop this row now
ExtraFeed = Callable[[dict[str, np.ndarray], np.ndarray], dict[str, np.ndarray]]  # (feed, write_pos) -> more inputs


@dataclass
class Generation:
    """One row's result."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (eos id, stop string, grammar complete) | "length" | "cancelled"
    logprobs: list[TokenLogprob] | None = None  # one per token id, when SamplingParams.logprobs is set
    drafted: int = 0  # speculative decoding (runtime/speculative.py): draft tokens verified
    accepted: int = 0  # ... and accepted


OnFinish = Callable[[int, Generation], None]  # (row, its complete result)


@dataclass
class Timings:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    new_tokens: int = 0
    decode_steps: int = 0  # backend steps after the prefill
    decode_tokens: int = 0  # tokens after the first (the longest row's): a verify step can yield several

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

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
            f"{max_seq_len}: shorten the prompt, lower {{opt:max_new_tokens}}, or re-export the bundle with a "
            "larger `qwen2edge export --max-seq-len`"
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


def extend_feed(chunks: Sequence[Sequence[int]], lengths: np.ndarray, cache_len: int, pad_id: int,
                all_logits: bool = False) -> dict[str, np.ndarray]:
    """Inputs for row b's tokens chunks[b] at positions lengths[b], lengths[b] + 1, ... over its filled slots
    [0, lengths[b]) of a cache of `cache_len` slots: a prompt after a reused prefix, a prompt chunk, a
    speculative verify step. Shorter rows are padded (masked as keys, not stored; an empty row feeds
    nothing). Logits at every position (all_logits) or after each row's last token."""
    b, t = len(chunks), max(1, max(len(c) for c in chunks))
    counts = np.array([len(c) for c in chunks], dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64).reshape(b)
    ids = np.full((b, t), pad_id, dtype=np.int64)
    for r, c in enumerate(chunks):
        ids[r, :len(c)] = c
    # Padding repeats the row's last position, so positions never pass the slots the row was checked for.
    steps = np.minimum(np.arange(t)[None, :], np.maximum(counts - 1, 0)[:, None])
    mask = np.zeros((b, cache_len + t), dtype=np.int64)
    mask[:, :cache_len] = np.arange(cache_len)[None, :] < lengths[:, None]
    mask[:, cache_len:] = np.arange(t)[None, :] < counts[:, None]
    index = np.broadcast_to(np.arange(t), (b, t)) if all_logits else np.maximum(counts - 1, 0)[:, None]
    return {
        io_spec.INPUT_IDS: ids,
        io_spec.POSITION_IDS: np.where(counts[:, None] > 0, lengths[:, None] + steps, 0),
        io_spec.ATTENTION_MASK: mask,
        io_spec.LOGITS_INDEX: np.ascontiguousarray(index, dtype=np.int64),
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
                 tokenizer, rng: np.random.Generator | None, constraint: Constraint | None = None):
        self.result = Generation(prompt_ids=list(map(int, prompt_ids)))
        self.params = params
        stop_ids = set(params.stop_token_ids or default_stop_ids)
        self.stop_ids = set() if params.ignore_eos else stop_ids
        self.logits = RowLogits(params, stop_ids, constraint)  # penalties, bias, bans, grammar
        if params.logprobs is not None:
            self.result.logprobs = []
        self.rng = rng  # None when the batch samples all rows with one shared generator
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.matcher = StopMatcher(params.stop_strings)
        self.history = list(self.result.prompt_ids)
        self.length = len(self.result.prompt_ids)  # cache slots filled
        self.done = False
        self.spec = None  # speculative decoding state, kept by runtime/speculative.py

    def sample(self, logits: np.ndarray, rng: np.random.Generator | None = None) -> int:
        """The next token from this row's logits [1, V] with its own sampler (or `rng`, a batch's shared one)."""
        tok = int(sample_next(self.scores(logits), self.params, rng or self.rng)[0])
        self.record(logits, tok)
        return tok

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """The logits [1, V] this row samples its next token from: grammar, bias, bans, penalties applied."""
        return self.logits.process(logits, self.history, len(self.result.token_ids))

    def record(self, logits: np.ndarray, tok: int) -> None:
        """Keep tok's log-probability under the raw logits [1, V], when the row asked for them."""
        if self.result.logprobs is not None and tok not in self.stop_ids:
            self.result.logprobs.append(token_logprob(logits[0], tok, self.params.logprobs))

    def accept(self, tok: int, on_text: Callable[[str], None] | None) -> bool:
        """Take a sampled token; returns True when the row is complete (then call `finish`)."""
        if tok in self.stop_ids:
            self.result.finish_reason = "stop"
            return True
        self.result.token_ids.append(tok)
        self.history.append(tok)
        self.logits.observe(tok)
        if self.decoder is not None:
            self._emit(self.decoder.push(tok), on_text)
        if self.logits.grammar_done:  # nothing but a stop id could follow: end without that step
            self.done, self.result.finish_reason = True, "stop"
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


class _Batch:
    """A static batch's rows and the caller's per-row callbacks (row index in, as `generate` documents)."""

    def __init__(self, rows: list[Row], shared_rng: np.random.Generator | None, on_text: OnText | None,
                 on_finish: OnFinish | None, should_stop: ShouldStop | None):
        self.rows, self.shared_rng = rows, shared_rng
        self.on_text, self.on_finish, self.should_stop = on_text, on_finish, should_stop

    @property
    def done(self) -> bool:
        return all(row.done for row in self.rows)

    def emit(self, r: int) -> Callable[[str], None] | None:
        on_text = self.on_text
        return (lambda delta: on_text(r, delta)) if on_text else None

    def finish(self, r: int) -> None:
        self.rows[r].finish(self.emit(r))
        if self.on_finish:
            self.on_finish(r, self.rows[r].result)

    def cancel_requested(self) -> None:
        if self.should_stop is None:
            return
        for r, row in enumerate(self.rows):
            if not row.done and self.should_stop(r):
                row.cancel()
                self.finish(r)


class Generator:
    """Generation over one bundle's backend: `prefill`, `decode_one`, `decode_n` (the shape of gpt-fast's
    generate.py), and `generate` tying them together for a batch of prompts.

    Build it with `Bundle.generator()`, which supplies the tokenizer, the stop ids and, for Dual Chunk
    Attention, the host-side position feed."""

    def __init__(self, backend: Backend, tokenizer=None, stop_token_ids: Sequence[int] = (),
                 extra_feed: ExtraFeed | None = None, cache_bucket: int = CACHE_BUCKET):
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_seq_len = backend.spec.max_seq_len
        self.default_stop_ids = tuple(stop_token_ids)
        self.extra_feed = extra_feed  # e.g. DCA position indices computed on the host
        self.cache_bucket = cache_bucket
        # Up to this sequence length a step over several positions (a verify step, a prompt chunk, keys
        # reused from an earlier step) equals one position per step; DCA's temperature makes it shorter.
        self.exact_until = int(getattr(extra_feed, "same_scale_until", self.max_seq_len))
        if backend.spec.dca and extra_feed is None:
            raise InternalError("a Dual Chunk Attention graph needs its host-side position inputs, and this "
                                "generator was built without them: report this as a qwen2edge bug")
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        self.pad_id = int(pad if pad is not None else (self.default_stop_ids or (0,))[0])
        vocab = next((t.shape[-1] for t in backend.spec.outputs if t.name == io_spec.LOGITS), None)
        if isinstance(vocab, int) and not 0 <= self.pad_id < vocab:
            self.pad_id = 0  # padding is masked, but its id is still embedded: it must be in the model's table
        self._grammar: GrammarEngine | None = None
        self._grammar_lock = threading.Lock()

    def grammar_engine(self) -> GrammarEngine:
        """The grammar engine over this generator's tokenizer, built on first use (1-2 s for a large
        vocabulary: callers that must not stall, like the server's event loop, call it from a thread)."""
        with self._grammar_lock:
            if self._grammar is None:
                if self.tokenizer is None:
                    raise InputError("constrained decoding needs the bundle's tokenizer, and this generator was "
                                     "built without one: open it from the bundle directory")
                self._grammar = GrammarEngine(self.tokenizer.to_json(), self.default_stop_ids)
            return self._grammar

    # ---- steps -----------------------------------------------------------------------------------

    def step(self, cache: KVCache, feed: dict[str, np.ndarray], write_pos: np.ndarray) -> np.ndarray:
        """One backend step with the host-side extra inputs (DCA) added; returns logits [B, N, V]."""
        if self.extra_feed is not None:
            feed = {**feed, **self.extra_feed(feed, write_pos)}
        return self.backend.step(cache, feed, write_pos)

    def new_cache(self, batch: int, longest: int) -> KVCache:
        """A cache for `batch` rows, starting at the smallest bucket that holds `longest` prompt tokens and
        the first new one: a step attends every slot it is handed, so the cache grows with the sequence."""
        capacity = cache_capacity(longest + 1, 0, self.max_seq_len, self.cache_bucket)
        return self.backend.new_cache(batch, capacity=capacity, bucket=self.cache_bucket)

    def prefill(self, cache: KVCache, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Run right-padded `prompts` into rows [0, B) of `cache`; logits [B, V] after each row's last token."""
        capacity = cache.reserve(max(len(p) for p in prompts))
        feed = prefill_feed(prompts, capacity, self.pad_id)
        return self.step(cache, feed, np.zeros(len(prompts), dtype=np.int64))[:, -1, :]

    def decode_one(self, cache: KVCache, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Run row b's token at position lengths[b] (slots [0, lengths[b]) filled); logits [B, V] after it."""
        capacity = cache.reserve(int(lengths.max()) + 1)
        return self.step(cache, decode_feed(tokens, lengths, capacity), lengths)[:, -1, :]

    def extend(self, cache: KVCache, chunks: Sequence[Sequence[int]], lengths: np.ndarray,
               all_logits: bool = False) -> np.ndarray:
        """Run row b's tokens chunks[b] at positions lengths[b].. (slots [0, lengths[b]) filled; a row may feed
        none); logits [B, V] after each row's last token, or [B, T, V] at every position with all_logits."""
        lengths = np.asarray(lengths, dtype=np.int64)
        capacity = cache.reserve(int(max(n + len(c) for n, c in zip(lengths, chunks))))
        feed = extend_feed(chunks, lengths, capacity, self.pad_id, all_logits)
        logits = self.step(cache, feed, lengths)
        return logits if all_logits else logits[:, -1, :]

    def verify(self, cache: KVCache, chunks: Sequence[Sequence[int]], lengths: np.ndarray) -> np.ndarray:
        """A speculative step: row b's next token and its draft tokens at positions lengths[b]..; logits
        [B, T, V] after each of them. Only the slots of accepted tokens count afterwards: a row's length
        advances by what it accepts, so rejected drafts' keys sit past it, masked, until overwritten."""
        return self.extend(cache, chunks, lengths, all_logits=True)

    def decode_n(self, cache: KVCache, batch: _Batch, logits: np.ndarray, timings: Timings,
                 speculator=None) -> None:
        """Sample and decode until every row has finished (stop id or string, its max_new_tokens, or a
        cancel). Finished rows keep their write position: the batch shape is static, so they are still
        computed, but never advance past the slots their own request was checked to fit in. With a
        `speculator` (runtime/speculative.py) each step also verifies draft tokens."""
        if speculator is not None:
            self._decode_speculative(cache, batch, logits, timings, speculator)
            return
        rows = batch.rows
        lengths = np.array([row.length for row in rows], dtype=np.int64)
        max_steps = max(row.params.max_new_tokens for row in rows)
        t0 = time.perf_counter()
        for step in range(max_steps):
            batch.cancel_requested()
            if batch.done:
                break
            tokens = self._sample(logits, rows, batch.shared_rng)
            for r, row in enumerate(rows):
                if row.done:
                    continue
                if row.accept(int(tokens[r]), batch.emit(r)):
                    batch.finish(r)
            if batch.done or step == max_steps - 1:
                break
            live = np.array([not row.done for row in rows])
            logits = self.decode_one(cache, tokens, lengths)
            lengths = lengths + live
            timings.decode_steps += 1
            timings.decode_tokens += 1
        self._end_decode(batch, lengths, timings, t0)

    def _decode_speculative(self, cache: KVCache, batch: _Batch, logits: np.ndarray, timings: Timings,
                            speculator) -> None:
        """decode_n with draft tokens: each step feeds every live row's next token and drafts, and the
        next accepts what the target agrees with (at least one token per row, so the loop ends)."""
        rows = batch.rows
        lengths = np.array([row.length for row in rows], dtype=np.int64)
        per_row = [logits[r:r + 1] for r in range(len(rows))]  # [T, V]: after the fed token and each draft
        drafts: list = [None] * len(rows)
        tokens = np.full(len(rows), self.pad_id, dtype=np.int64)
        yielded = np.zeros(len(rows), dtype=np.int64)  # tokens each row accepted after its first
        t0 = time.perf_counter()
        for step in itertools.count():
            batch.cancel_requested()
            if batch.done:
                break
            for r, row in enumerate(rows):
                if row.done:
                    continue
                run = speculator.accept(row, per_row[r], drafts[r], row.rng or batch.shared_rng, batch.emit(r))
                tokens[r], lengths[r] = run.token, lengths[r] + run.drafts
                yielded[r] += run.tokens if step else 0
                if run.complete:
                    batch.finish(r)
            timings.decode_tokens = int(yielded.max())
            if batch.done:
                break
            live = [r for r, row in enumerate(rows) if not row.done]
            drafts = [None] * len(rows)
            for r, draft in zip(live, speculator.propose([rows[r] for r in live], lengths[live],
                                                                  batch.shared_rng)):
                drafts[r] = draft
            chunks = [[int(tokens[r]), *(drafts[r].tokens if drafts[r] else ())] if not row.done else []
                      for r, row in enumerate(rows)]
            out = self.verify(cache, chunks, lengths)
            per_row = [out[r, :max(1, len(c))] for r, c in enumerate(chunks)]
            lengths[live] += 1
            timings.decode_steps += 1
        self._end_decode(batch, lengths, timings, t0)

    def _end_decode(self, batch: _Batch, lengths: np.ndarray, timings: Timings, t0: float) -> None:
        timings.decode_s = time.perf_counter() - t0
        timings.new_tokens = sum(len(row.result.token_ids) for row in batch.rows)
        for r, row in enumerate(batch.rows):
            row.length = int(lengths[r])
            if not row.done:
                batch.finish(r)

    # ---- whole generations -------------------------------------------------------------------------

    def new_row(self, prompt_ids: Sequence[int], params: SamplingParams) -> Row:
        """A row with its own seeded sampler (and grammar), checked to fit the cache."""
        check_fits([len(prompt_ids)], params.max_new_tokens, self.max_seq_len)
        return Row(prompt_ids, params, self.default_stop_ids, self.tokenizer, make_rng(params.seed),
                   self._constraint(params))

    def _constraint(self, params: SamplingParams) -> Constraint | None:
        return self.grammar_engine().constraint(params.grammar) if params.grammar is not None else None

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 on_text: OnText | None = None, *, should_stop: ShouldStop | None = None,
                 on_finish: OnFinish | None = None, speculator=None) -> tuple[list[Generation], Timings]:
        """Generate for a batch of token-id prompts; `on_text(row, delta)` streams text.

        `params` is one SamplingParams for every row, or one per row (then each row samples with its own
        seeded generator, so a row's output does not depend on what it is batched with). A row stops
        early when `should_stop(row)` turns true (finish_reason "cancelled"); `on_finish(row, result)`
        fires as soon as a row is complete, before slower rows in the batch are. A `speculator`
        (runtime/speculative.py) proposes draft tokens that each step verifies.
        """
        return self.run_rows(*self._rows(prompts, params), on_text=on_text, should_stop=should_stop,
                             on_finish=on_finish, speculator=speculator)

    def run_rows(self, rows: list[Row], shared_rng: np.random.Generator | None = None, *,
                 on_text: OnText | None = None, should_stop: ShouldStop | None = None,
                 on_finish: OnFinish | None = None, speculator=None) -> tuple[list[Generation], Timings]:
        """`generate` for rows made by `new_row` (a caller that keeps each row's result as it grows)."""
        batch = _Batch(rows, shared_rng, on_text, on_finish, should_stop)
        timings = Timings()
        cache = self.new_cache(len(batch.rows), max(row.length for row in batch.rows))
        t0 = time.perf_counter()
        logits = self.prefill(cache, [row.result.prompt_ids for row in batch.rows])
        timings.prefill_s = time.perf_counter() - t0
        self.decode_n(cache, batch, logits, timings, speculator)
        return [row.result for row in batch.rows], timings

    def _rows(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
              ) -> tuple[list[Row], np.random.Generator | None]:
        """Rows for the prompts, and the generator they share when one SamplingParams covers them all."""
        if isinstance(params, SamplingParams):
            check_fits([len(p) for p in prompts], params.max_new_tokens, self.max_seq_len)
            rows = [Row(p, params, self.default_stop_ids, self.tokenizer, None, self._constraint(params))
                    for p in prompts]
            return rows, make_rng(params.seed)
        plist = list(params)
        if len(plist) != len(prompts):
            raise InternalError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts: report this as a "
                                "qwen2edge bug")
        return [self.new_row(p, rp) for p, rp in zip(prompts, plist)], None

    def _sample(self, logits: np.ndarray, rows: list[Row], shared_rng: np.random.Generator | None) -> np.ndarray:
        if shared_rng is not None and not rows[0].params.per_row:
            params = rows[0].params
            history = [row.history for row in rows] if params.repetition_penalty != 1.0 else None
            return sample_next(logits, params, shared_rng, history)
        nxt = np.full(len(rows), self.pad_id, dtype=np.int64)
        for r, row in enumerate(rows):
            if not row.done:
                nxt[r] = row.sample(logits[r:r + 1], shared_rng)
        return nxt
