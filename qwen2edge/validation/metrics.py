"""Accuracy metrics between a reference's logits / hidden states and a backend's.

Reused from Polygraphy (polygraphy.comparator, pure Python, importable without TensorRT):
SimpleCompareFunc for the max/mean absolute error of each step's logits and CosineSimilarityCompareFunc
for cosine similarity, so these numbers mean exactly what `polygraphy run --check-error-stat` reports.
Written here, because Polygraphy has no equivalent: KL(p_ref || p) and perplexity (it compares raw
tensors, not distributions), top-1 agreement / top-k overlap (its IndicesCompareFunc checks index
*positions* within a tolerance, not set overlap), greedy match length, and the relative error: its
`max_reldiff` is elementwise |d| / |ref|, which explodes on logits near zero, so ours divides by the
row's largest |ref| logit (the scale a softmax sees), as `qwen2edge validate` does.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import InputError


@contextlib.contextmanager
def _polygraphy() -> Iterator[Any]:
    """polygraphy.comparator with its logger quiet (we report the numbers ourselves)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its deprecation notices about other APIs
            from polygraphy import comparator
            from polygraphy.logger import G_LOGGER
    except ImportError:
        raise InputError("qwen2edge compare needs Polygraphy: pip install 'qwen2edge[export]' "
                         "(or pip install polygraphy)") from None
    old = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    try:
        yield comparator
    finally:
        G_LOGGER.module_severity = old


def polygraphy_errors(ref: np.ndarray, ours: np.ndarray) -> tuple[float, float, float]:
    """(max |d|, mean |d|, cosine similarity) of two same-shape arrays via Polygraphy's comparators."""
    with _polygraphy() as comp:
        r_ours = comp.IterationResult({"x": np.ascontiguousarray(ours)}, runner_name="backend")
        r_ref = comp.IterationResult({"x": np.ascontiguousarray(ref)}, runner_name="reference")
        # Tolerances are irrelevant (we only read the statistics); infinite ones keep it from logging failures.
        simple = comp.SimpleCompareFunc(check_error_stat="max", atol=np.inf, rtol=np.inf)(r_ours, r_ref)["x"]
        cosine = comp.CosineSimilarityCompareFunc(cosine_similarity_threshold=-1.0)(r_ours, r_ref)["x"]
    return float(simple.max_absdiff), float(simple.mean_absdiff), float(cosine.cosine_similarity)


def block_errors(ref: np.ndarray, ours: np.ndarray) -> tuple[float, float, float]:
    """polygraphy_errors for a large block (a prompt's prefill logits) in plain numpy: the same definitions
    (max and mean |d| over all elements, cosine of the flattened arrays) without Polygraphy's extra
    statistics (medians, histograms), which cost ~0.7 s per 15 x 151k block."""
    r, o = np.asarray(ref, dtype=np.float64).ravel(), np.asarray(ours, dtype=np.float64).ravel()
    d = np.abs(o - r)
    cosine = float(r @ o / (np.linalg.norm(r) * np.linalg.norm(o) + 1e-30))
    return float(d.max()), float(d.mean()), cosine


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(p_ref || p) in nats for each row (last axis = vocabulary)."""
    lr, lp = log_softmax(ref_logits), log_softmax(logits)
    return (np.exp(lr) * (lr - lp)).sum(axis=-1)


def relative_error(ref: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """Per row: max |ours - ref| / max |ref| (see the module docstring for why not elementwise)."""
    ref = np.asarray(ref, dtype=np.float64)
    d = np.abs(np.asarray(ours, dtype=np.float64) - ref).max(axis=-1)
    return d / (np.abs(ref).max(axis=-1) + 1e-12)


def top1_agreement(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per row: 1.0 where both argmaxes agree."""
    return (np.argmax(ref_logits, axis=-1) == np.argmax(logits, axis=-1)).astype(np.float64)


def topk_overlap(ref_logits: np.ndarray, logits: np.ndarray, k: int = 5) -> np.ndarray:
    """Per row: |top-k(ref) ∩ top-k(ours)| / k (order inside the top k does not matter)."""
    ref2, ours2 = np.atleast_2d(ref_logits), np.atleast_2d(logits)
    a = np.argpartition(-ref2, k - 1, axis=-1)[:, :k]
    b = np.argpartition(-ours2, k - 1, axis=-1)[:, :k]
    out = np.array([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(a, b)])
    return out if np.ndim(ref_logits) > 1 else out[:1]


def greedy_match_length(ref_tokens: Sequence[int], tokens: Sequence[int]) -> int:
    """How many leading tokens are identical."""
    n = 0
    for a, b in zip(ref_tokens, tokens):
        if a != b:
            break
        n += 1
    return n


def perplexity(logits: np.ndarray, ids: Sequence[int]) -> float:
    """exp(mean NLL) of ids[1:] given logits [len(ids), V] (row t predicts ids[t + 1])."""
    ids = np.asarray(ids)
    if len(ids) < 2:
        raise InputError("perplexity needs a text of at least two tokens: give a longer text")
    lp = log_softmax(np.asarray(logits)[:-1])
    nll = -lp[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean()))


@dataclass
class StepMetrics:
    """One teacher-forced step: the logits that predict one token."""

    step: int
    max_abs: float
    mean_abs: float
    rel: float
    cosine: float
    kl: float
    top1: float
    top5: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def step_metrics(step: int, ref_row: np.ndarray, row: np.ndarray) -> StepMetrics:
    """Every per-step metric for one vocabulary row."""
    max_abs, mean_abs, cosine = polygraphy_errors(ref_row.astype(np.float32), row.astype(np.float32))
    return StepMetrics(step, max_abs, mean_abs, float(relative_error(ref_row, row)), cosine,
                       float(kl_divergence(ref_row, row)), float(top1_agreement(ref_row, row)),
                       float(topk_overlap(ref_row, row, 5)[0]))


@dataclass
class LayerMetrics:
    """Hidden-state drift of one transformers output_hidden_states entry."""

    index: int
    name: str
    max_abs: float
    mean_abs: float
    rel_l2: float  # ||ours - ref|| / ||ref|| over all positions
    cosine: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_metrics(index: int, name: str, ref: np.ndarray, ours: np.ndarray) -> LayerMetrics:
    """Drift of one hidden state [T, C] (all positions together)."""
    max_abs, mean_abs, cosine = polygraphy_errors(ref.astype(np.float32), ours.astype(np.float32))
    ref64 = ref.astype(np.float64)
    rel = float(np.linalg.norm(ours.astype(np.float64) - ref64) / (np.linalg.norm(ref64) + 1e-12))
    return LayerMetrics(index, name, max_abs, mean_abs, rel, cosine)


# Log-spaced bins for the |delta logit| histogram: 1e-8 .. 1e2, 4 bins a decade; exact zeros counted apart.
HIST_EDGES = np.logspace(-8, 2, 41)


class ErrorHistogram:
    """Accumulates |ours - ref| of every compared logit into fixed log bins."""

    def __init__(self) -> None:
        self.counts = np.zeros(len(HIST_EDGES) - 1, dtype=np.int64)
        self.zeros = 0
        self.below = 0
        self.above = 0

    def add(self, ref: np.ndarray, ours: np.ndarray) -> None:
        d = np.abs(np.asarray(ours, dtype=np.float64) - ref).ravel()
        self.zeros += int((d == 0).sum())
        d = d[d > 0]
        self.below += int((d < HIST_EDGES[0]).sum())
        self.above += int((d > HIST_EDGES[-1]).sum())  # np.histogram keeps == last edge
        self.counts += np.histogram(d, bins=HIST_EDGES)[0]

    def to_dict(self) -> dict[str, Any]:
        return {"edges": [float(e) for e in HIST_EDGES], "counts": self.counts.tolist(), "zeros": self.zeros,
                "below_range": self.below, "above_range": self.above}
