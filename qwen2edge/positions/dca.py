"""Dual Chunk Attention position indices, computed on the host (pure numpy; the runtime imports this).

Follows the vLLM / Qwen2.5-1M variant: with chunk size C, local size w and period s = C - w,
a key at token index j is rotated to P_k = j mod s, and a query at index i uses
  intra  P_k[i]                    for keys in its own chunk (floor(j/s) == floor(i/s)),
  succ   min(s + (i mod s), C)     for keys in the previous chunk,
  inter  min(2s - 1, C)            for keys two or more chunks back.
Because P_k depends only on the key, keys can be cached already rotated.
"""

from __future__ import annotations

import numpy as np

from ..config import DualChunkConfig

INTRA, SUCC, INTER = 0, 1, 2  # selector values: clamp(chunk(query) - chunk(key), 0, 2)


def key_positions(pos: np.ndarray, dc: DualChunkConfig) -> np.ndarray:
    """P_k = pos mod s (also the intra-chunk query position)."""
    return np.asarray(pos, dtype=np.int64) % dc.period


def succ_positions(pos: np.ndarray, dc: DualChunkConfig) -> np.ndarray:
    """P_succ = min(s + (pos mod s), C): the query position used against the previous chunk."""
    return np.minimum(dc.period + key_positions(pos, dc), dc.chunk_size)


def inter_positions(pos: np.ndarray, dc: DualChunkConfig) -> np.ndarray:
    """P_inter = min(2s - 1, C) for every query: used against chunks two or more back."""
    return np.full(np.shape(pos), min(2 * dc.period - 1, dc.chunk_size), dtype=np.int64)


def chunk_ids(pos: np.ndarray, dc: DualChunkConfig) -> np.ndarray:
    """floor(pos / s)."""
    return np.asarray(pos, dtype=np.int64) // dc.period


def selector(q_pos: np.ndarray, k_pos: np.ndarray, dc: DualChunkConfig) -> np.ndarray:
    """[len(q), len(k)] set per pair (INTRA / SUCC / INTER); causality is applied separately."""
    delta = chunk_ids(q_pos, dc)[:, None] - chunk_ids(k_pos, dc)[None, :]
    return np.clip(delta, INTRA, INTER)


def temperature(length: np.ndarray | int, dc: DualChunkConfig) -> np.ndarray:
    """sf(L) = max(1, 1 + 0.1 ln(L / L0)) when L0 > 0, else 1 (float32, one per row)."""
    length = np.asarray(length, dtype=np.float64)
    if dc.original_max_position_embeddings <= 0:
        return np.ones(length.shape, dtype=np.float32)
    sf = 1.0 + 0.1 * np.log(np.maximum(length, 1.0) / dc.original_max_position_embeddings)
    return np.maximum(sf, 1.0).astype(np.float32)


def table_rows(dc: DualChunkConfig, max_seq_len: int) -> int:
    """Rotary table rows a DCA graph needs: every index stays <= C (and below max_seq_len while the
    sequence cannot leave the first chunk, when only intra positions are ever selected)."""
    if max_seq_len <= dc.period:
        return max_seq_len
    return dc.chunk_size + 1


def describe(dc: DualChunkConfig) -> str:
    """One line for logs and reports."""
    temp = (f", temperature from L0={dc.original_max_position_embeddings}"
            if dc.original_max_position_embeddings > 0 else ", no temperature")
    return f"DCA chunk_size {dc.chunk_size}, local_size {dc.local_size} (period {dc.period}){temp}"

