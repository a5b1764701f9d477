"""Typed, frozen model configuration built from a Hugging Face Qwen2 config.json (torch-free)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import InputError

SUPPORTED_MODEL_TYPES = ("qwen2",)
ROPE_TYPES = ("default", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """YaRN settings (HF `rope_scaling` / `rope_parameters`); keys follow transformers' names."""

    rope_type: str = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class DualChunkConfig:
    """Dual Chunk Attention settings (`dual_chunk_attention_config`)."""

    chunk_size: int
    local_size: int
    original_max_position_embeddings: int = 0

    @property
    def period(self) -> int:
        """Chunk period s = chunk_size - local_size."""
        return self.chunk_size - self.local_size


@dataclass(frozen=True)
class ModelConfig:
    """The Qwen2 decoder hyper-parameters the graph and runtime need."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = True
    rope_scaling: RopeScaling | None = None
    dual_chunk: DualChunkConfig | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    @property
    def rotary_dim(self) -> int:
        """Number of rotated channels per head (even)."""
        return int(self.head_dim * self.partial_rotary_factor) // 2 * 2

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (recorded in manifest.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of `to_dict` (reads a manifest)."""
        d = dict(data)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        if d.get("dual_chunk"):
            d["dual_chunk"] = DualChunkConfig(**d["dual_chunk"])
        d["eos_token_id"] = tuple(d.get("eos_token_id") or ())
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _as_float(v: Any, default: float | None) -> float | None:
    return default if v is None else float(v)


def parse_rope_scaling(raw: Mapping[str, Any] | None) -> RopeScaling | None:
    """Read a rope scaling dict in any spelling found in the wild; None for plain RoPE."""
    if not raw:
        return None
    rope_type = raw.get("rope_type", raw.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type not in ROPE_TYPES:
        raise InputError(
            f"unsupported rope type {rope_type!r} in config.json; qwen2edge supports "
            f"{', '.join(ROPE_TYPES)}: remove rope_scaling or set its type to 'yarn'"
        )
    factor = raw.get("factor")
    if factor is None or float(factor) <= 1.0:
        raise InputError(
            f"YaRN needs a rope scaling factor > 1 (got {factor!r}): set rope_scaling.factor, e.g. 4.0"
        )
    omp = raw.get("original_max_position_embeddings")
    return RopeScaling(
        rope_type="yarn",
        factor=float(factor),
        original_max_position_embeddings=None if omp is None else int(omp),
        # transformers treats 0/None as "use the default".
        beta_fast=float(raw.get("beta_fast") or 32.0),
        beta_slow=float(raw.get("beta_slow") or 1.0),
        mscale=_as_float(raw.get("mscale"), None),
        mscale_all_dim=_as_float(raw.get("mscale_all_dim"), None),
        attention_factor=_as_float(raw.get("attention_factor"), None),
        truncate=bool(raw.get("truncate", True)),
    )


def parse_dual_chunk(raw: Mapping[str, Any] | None) -> DualChunkConfig | None:
    """Read `dual_chunk_attention_config`; None when absent."""
    if not raw:
        return None
    try:
        cfg = DualChunkConfig(
            chunk_size=int(raw["chunk_size"]),
            local_size=int(raw["local_size"]),
            original_max_position_embeddings=int(raw.get("original_max_position_embeddings") or 0),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(
            f"dual_chunk_attention_config is incomplete ({exc}): give integer chunk_size and local_size"
        ) from None
    if not 0 < cfg.local_size < cfg.chunk_size:
        raise InputError(
            f"DCA needs 0 < local_size < chunk_size (got local_size={cfg.local_size}, "
            f"chunk_size={cfg.chunk_size}): lower local_size or raise chunk_size"
        )
    return cfg


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a parsed HF config.json (transformers 4.x or 5.x spelling)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"config.json has model_type {model_type!r}; qwen2edge exports Qwen2 decoders only "
            "(model_type 'qwen2'): convert the checkpoint to Qwen2 first"
        )
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
        raise InputError(f"config.json lacks {', '.join(missing)}: use the config.json saved with the checkpoint")
    # transformers 5 moved rope_theta (and the scaling dict) into `rope_parameters`.
    rope_params = dict(hf.get("rope_parameters") or {})
    rope_theta = float(rope_params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling_raw = hf.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default" else None)
    if scaling_raw and hf.get("original_max_position_embeddings") is not None:
        # transformers gives a top-level original_max_position_embeddings priority over the dict's (Phi-3 style).
        scaling_raw = {**scaling_raw, "original_max_position_embeddings": hf["original_max_position_embeddings"]}
    heads = int(hf["num_attention_heads"])
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    hidden = int(hf["hidden_size"])
    head_dim = int(hf.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise InputError(
            f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads}): fix config.json"
        )
    eos = hf.get("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
    dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        partial_rotary_factor=float(rope_params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", True)),
        rope_scaling=parse_rope_scaling(scaling_raw),
        dual_chunk=parse_dual_chunk(hf.get("dual_chunk_attention_config")),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos_ids,
        torch_dtype=dtype,
    )


def load_hf_config(model_dir: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Read MODEL_DIR/config.json; returns (typed config, raw dict). Raises InputError with a fix."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise InputError(f"model directory {model_dir} does not exist: pass the checkpoint directory")
    if not model_dir.is_dir():
        raise InputError(f"{model_dir} is not a directory: pass the checkpoint directory holding config.json")
    path = model_dir / "config.json"
    if not path.is_file():
        raise InputError(f"{path} is missing: a Hugging Face checkpoint directory must hold config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}): restore the original config.json") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path} must hold a JSON object: restore the original config.json")
    return config_from_hf(raw), raw


@dataclass(frozen=True)
class LongContextOverrides:
    """`qwen2edge export` flags that change config.json's long-context settings, the way Qwen model cards
    tell users to edit config.json (None: keep the checkpoint's setting).

    rope_scaling yarn|none replaces the checkpoint's rope scaling; rope_factor and
    original_max_position_embeddings change one key of the (existing or new) YaRN dict; the dca_* sizes
    create or change the Dual Chunk Attention settings."""

    rope_scaling: str | None = None  # "yarn" | "none"
    rope_factor: float | None = None
    original_max_position_embeddings: int | None = None
    dca_chunk_size: int | None = None
    dca_local_size: int | None = None
    dca_original_max_position_embeddings: int | None = None

    def given(self) -> dict[str, Any]:
        """The overrides that were set (recorded in the manifest)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def apply(self, cfg: ModelConfig) -> ModelConfig:
        """`cfg` with these overrides applied (one-line InputError naming the flag on a bad combination)."""
        return cfg.replace(rope_scaling=self._rope_scaling(cfg.rope_scaling), dual_chunk=self._dual_chunk(cfg.dual_chunk))

    def _rope_scaling(self, scaling: RopeScaling | None) -> RopeScaling | None:
        kind, factor, l0 = self.rope_scaling, self.rope_factor, self.original_max_position_embeddings
        if kind is not None and kind not in ("none", *ROPE_TYPES):
            raise InputError(f"unknown {{opt:rope_scaling}} {kind!r}: pass yarn, or none to disable scaling")
        if kind in ("none", "default"):
            if factor is not None or l0 is not None:
                raise InputError("{opt:rope_factor}/{opt:original_max_position_embeddings} need YaRN: add "
                                 "{opt:rope_scaling} yarn")
            return None
        if kind != "yarn" and factor is None and l0 is None:
            return scaling
        raw: dict[str, Any] = dataclasses.asdict(scaling) if scaling is not None else {"rope_type": "yarn"}
        if factor is not None:
            raw["factor"] = factor
        elif scaling is None:
            raw["factor"] = None  # parse_rope_scaling reports the missing factor with its fix
        if l0 is not None:
            raw["original_max_position_embeddings"] = l0
        return parse_rope_scaling(raw)

    def _dual_chunk(self, dual: DualChunkConfig | None) -> DualChunkConfig | None:
        sizes = (("chunk_size", self.dca_chunk_size), ("local_size", self.dca_local_size),
                 ("original_max_position_embeddings", self.dca_original_max_position_embeddings))
        if all(value is None for _, value in sizes):
            return dual
        raw: dict[str, Any] = dataclasses.asdict(dual) if dual is not None else {}
        raw.update({key: value for key, value in sizes if value is not None})
        if "chunk_size" not in raw or "local_size" not in raw:
            raise InputError("Dual Chunk Attention needs both sizes: pass {opt:dca_chunk_size} and {opt:dca_local_size}")
        return parse_dual_chunk(raw)


def resolve_long_context(cfg: ModelConfig) -> tuple[ModelConfig, list[str]]:
    """The effective long-context setup and human-readable notes on what was resolved.

    With both YaRN and DCA configured, DCA wins and YaRN is dropped (as vLLM / Qwen2.5-1M do): DCA's
    position indices are defined on plain RoPE.
    """
    notes: list[str] = []
    if cfg.dual_chunk is not None:
        dc = cfg.dual_chunk
        if dc.chunk_size > cfg.max_position_embeddings:
            raise InputError(
                f"DCA chunk_size {dc.chunk_size} exceeds the model's max_position_embeddings "
                f"{cfg.max_position_embeddings} (DCA query positions reach chunk_size, beyond what the model was "
                f"trained on): pass {{opt:dca_chunk_size}} {cfg.max_position_embeddings} or less")
        if cfg.rope_scaling is not None:
            notes.append(f"both YaRN (factor {cfg.rope_scaling.factor:g}) and Dual Chunk Attention are configured: "
                         "DCA wins and YaRN is ignored (DCA runs on plain RoPE, as in vLLM / Qwen2.5-1M)")
            cfg = cfg.replace(rope_scaling=None)
    return cfg, notes
