"""Next-token selection over [B, V] logits in pure numpy, shared by every backend."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from ..errors import InferenceError, InputError

if TYPE_CHECKING:
    from .constrain import Grammar

# A nucleus that reaches top_p up to this much rounding counts as reaching it; without it,
# probs like [0.5, 0.3, ...] with top_p=0.8 keep a third token or not depending on float noise.
_TOP_P_EPS = 1e-6

PrevIds = Sequence[Sequence[int]] | np.ndarray
MAX_LOGPROBS = 20  # alternatives per position, OpenAI's limit
PENALTY_RANGE = 2.0  # presence/frequency penalties lie in [-2, 2] (OpenAI)
BIAS_RANGE = 100.0  # logit_bias values lie in [-100, 100] (OpenAI)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings; temperature 0 means greedy, top_k 0 and top_p 1 mean no filtering.

    Per-row extensions (`runtime/logits.py` applies them): OpenAI's presence/frequency penalties over the
    generated tokens and logit_bias (token id -> added bias); min_tokens bans the stop ids until that many
    tokens exist; ignore_eos keeps generating past them; logprobs (0..20 alternatives) records each new
    token's log-probability; grammar constrains the output (`runtime/constrain.py`)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    grammar: "Grammar | None" = None

    def __post_init__(self) -> None:
        # Callers often pass lists and dicts; tuples keep the frozen instance hashable.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((t, b) for t, b in bias))
        self.validate()

    def validate(self) -> None:
        """Raise InputError naming the bad value and the option that sets it (spelled by the interface)."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InputError(
                f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}: "
                "set {opt:max_new_tokens} to 1 or more"
            )
        if not _is_real(self.temperature) or not self.temperature >= 0:
            raise InputError(
                f"temperature must be >= 0, got {self.temperature!r}: "
                "set {opt:temperature} to 0 for greedy or a positive value"
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0, got {self.top_k!r}: set {{opt:top_k}} to 0 to disable it")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}: set {{opt:top_p}} between 0 and 1")
        if not _is_real(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise InputError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty!r}: "
                "set {opt:repetition_penalty} to 1.0 to disable it"
            )
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise InputError(f"seed must be an integer >= 0, got {self.seed!r}: set {{opt:seed}} to 0 or more")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or abs(value) > PENALTY_RANGE:
                raise InputError(f"{name} must be in [-2, 2], got {value!r}: set {{opt:{name}}} within that range "
                                 "(0 disables it)")
        for tok, bias in self.logit_bias:
            if not _is_int(tok) or tok < 0:
                raise InputError(f"logit_bias keys must be token ids >= 0, got {tok!r}: fix {{opt:logit_bias}}")
            if not _is_real(bias) or abs(bias) > BIAS_RANGE:
                raise InputError(f"logit_bias values must be in [-100, 100], got {bias!r} for token {tok}: "
                                 "fix {opt:logit_bias}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InputError(f"min_tokens must be an integer from 0 to the {self.max_new_tokens} new tokens asked for, "
                             f"got {self.min_tokens!r}: lower {{opt:min_tokens}} or raise {{opt:max_new_tokens}}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InputError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}: "
                             "fix {opt:logprobs}")

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax."""
        return self.temperature == 0

    @property
    def per_row(self) -> bool:
        """Whether a row needs more than the batched sampler: penalties, bias, bans, logprobs or a grammar."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.min_tokens
                    or self.logprobs is not None or self.grammar is not None)


def _is_int(value: object) -> bool:
    # bool is an int subclass; `--top-k True` is a bug, not 1.
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return _is_int(value) or (isinstance(value, (float, np.floating)) and math.isfinite(value))


def make_rng(seed: int | None) -> np.random.Generator:
    """A PCG64 generator; the same seed gives the same samples on every platform."""
    return np.random.default_rng(seed)


def _check_logits(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise InputError(f"logits must have shape [batch, vocab], got {logits.shape}: pass the last-position logits")
    return logits


def apply_repetition_penalty(logits: np.ndarray, prev_ids: PrevIds, penalty: float) -> np.ndarray:
    """CTRL penalty: for ids seen in a row, positive logits are divided by penalty, negative multiplied.

    Each id counts once per row however often it occurred. Returns a new array.
    """
    logits = _check_logits(logits)
    batch, vocab = logits.shape
    if len(prev_ids) != batch:
        raise InputError(f"prev_ids has {len(prev_ids)} rows but logits has {batch}: pass one id list per batch row")
    if penalty == 1.0:
        return logits.copy()
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    for b, ids in enumerate(prev_ids):
        ids = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        if ids.size and (ids[0] < 0 or ids[-1] >= vocab):
            raise InputError(f"prev_ids row {b} holds ids outside [0, {vocab}): strip padding before penalizing")
        rows.append(np.full(ids.shape, b, dtype=np.int64))
        cols.append(ids)
    seen = np.zeros(logits.shape, dtype=bool)
    seen[np.concatenate(rows), np.concatenate(cols)] = True
    penalized = np.where(logits < 0, logits * penalty, logits / penalty).astype(logits.dtype, copy=False)
    return np.where(seen, penalized, logits)


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Per-row float64 distribution after temperature, top-k and top-p; filtered tokens get 0.

    Temperature 0 yields a one-hot on the argmax, so greedy is a special case of the same contract.
    """
    logits = _check_logits(logits).astype(np.float64)
    batch, vocab = logits.shape
    if params.temperature == 0:
        probs = np.zeros_like(logits)
        probs[np.arange(batch), _argmax(logits)] = 1.0
        return probs

    scores = logits / params.temperature
    if 0 < params.top_k < vocab:
        # Ties with the k-th score are kept, as transformers does.
        kth = np.partition(scores, vocab - params.top_k, axis=-1)[:, vocab - params.top_k, None]
        scores = np.where(scores < kth, -np.inf, scores)

    probs = _softmax(scores)
    if params.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = mass_before < params.top_p - _TOP_P_EPS
        keep_sorted[:, 0] = True
        keep = np.empty_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def _softmax(scores: np.ndarray) -> np.ndarray:
    peak = scores.max(axis=-1, keepdims=True)
    bad = ~np.isfinite(peak[:, 0]) | np.isnan(scores).any(axis=-1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InferenceError(
            f"logits row {row} holds NaN/inf or only -inf: the model produced invalid scores; re-export in float32"
        )
    exp = np.exp(scores - peak)
    return exp / exp.sum(axis=-1, keepdims=True)


def _argmax(logits: np.ndarray) -> np.ndarray:
    picked = np.argmax(logits, axis=-1)
    # argmax returns a row's first NaN if it has one, so checking the picked values (B of them, not
    # B x vocab: this runs every decode step) finds every row holding NaN.
    bad = np.isnan(logits[np.arange(logits.shape[0]), picked])
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InferenceError(f"logits row {row} holds NaN: the model produced invalid scores; re-export in float32")
    return picked.astype(np.int64)


def sample_next(
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    prev_ids: PrevIds | None = None,
) -> np.ndarray:
    """Pick one token per row: argmax when greedy, else a draw from `probabilities`. Returns int64 [B]."""
    logits = _check_logits(logits)
    if prev_ids is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, prev_ids, params.repetition_penalty)
    if params.greedy:
        return _argmax(logits)

    return draw(probabilities(logits, params), rng)


def draw(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One index per row of [B, V] probabilities (they need not sum to exactly 1). Returns int64 [B]."""
    cdf = np.cumsum(probs, axis=-1)
    # 1 - random() lies in (0, 1], so a zero-probability token at index 0 can never be drawn.
    u = (1.0 - rng.random(probs.shape[0]))[:, None] * cdf[:, -1:]
    picked = (cdf < u).sum(axis=-1)
    return np.minimum(picked, probs.shape[1] - 1).astype(np.int64)
