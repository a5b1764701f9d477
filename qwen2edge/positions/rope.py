"""Rotary cos/sin tables, precomputed at export (plain RoPE and YaRN). Pure numpy functions.

The tables are gathered by position inside the graph, so long-context variants only change the
table contents (YaRN) or the position indices fed to it (DCA), never the graph structure.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import ModelConfig, RopeScaling


def _pos_freqs(dim: int, base: float) -> np.ndarray:
    """base^(2d/dim) rounded to float32. transformers computes it with torch's float32 pow; the
    correctly rounded float64 result matches it bit for bit far more often than numpy's float32 pow."""
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float64(base) ** exponents.astype(np.float64)).astype(np.float32)


def default_inv_freq(dim: int, base: float) -> np.ndarray:
    """theta_d = base^(-2d/dim) for d in [0, dim/2), float32 as transformers computes it."""
    return (np.float32(1.0) / _pos_freqs(dim, base)).astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_range(dim: int, base: float, l0: int, beta_fast: float, beta_slow: float,
                          truncate: bool) -> tuple[float, float]:
    """(low, high) pair indices between which YaRN blends extrapolation and interpolation."""

    def dim_for_rotations(r: float) -> float:
        return dim * math.log(l0 / (r * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_inv_freq(dim: int, base: float, scaling: RopeScaling, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """YaRN inverse frequencies and attention factor (transformers >= 5 semantics)."""
    s = scaling.factor
    l0 = scaling.original_max_position_embeddings or max_position_embeddings
    if scaling.attention_factor is not None:
        af = scaling.attention_factor
    elif scaling.mscale and scaling.mscale_all_dim:
        af = _yarn_mscale(s, scaling.mscale) / _yarn_mscale(s, scaling.mscale_all_dim)
    else:
        af = _yarn_mscale(s)
    low, high = yarn_correction_range(dim, base, l0, scaling.beta_fast, scaling.beta_slow, scaling.truncate)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    pos_freqs = _pos_freqs(dim, base)
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(s) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv.astype(np.float32), float(af)


def rotary_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inv_freq [rotary_dim/2], attention factor) for the config's rope type.

    DCA uses plain RoPE: when both are configured, DCA's rotary wins (spec section 2.5).
    """
    dim = cfg.rotary_dim
    if cfg.rope_scaling is not None and cfg.dual_chunk is None:
        return yarn_inv_freq(dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    return default_inv_freq(dim, cfg.rope_theta), 1.0


def rotary_tables(cfg: ModelConfig, num_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables [num_positions, rotary_dim] float32, attention factor folded in.

    Each pair's value appears twice (neox / HF rotate_half layout).
    """
    inv_freq, af = rotary_inv_freq(cfg)
    pos = np.arange(num_positions, dtype=np.float32)
    angles = np.outer(pos, inv_freq).astype(np.float32)  # [P, D/2], float32 like transformers
    emb = np.concatenate([angles, angles], axis=-1).astype(np.float64)  # [P, D]
    cos = (np.cos(emb) * af).astype(np.float32)
    sin = (np.sin(emb) * af).astype(np.float32)
    return cos, sin
