"""Typed, frozen model configuration built from a Hugging Face Qwen2 config.json (torch-free)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import InputError

SUPPORTED_MODEL_TYPES = ("qwen2",)
ROPE_TYPES = ("default", "yarn")


def _bad(name: str, value: Any, need: str) -> InputError:
    return InputError(f"config.json {name} must be {need}, got {value!r}: restore the original config.json")


def _check_int(name: str, value: Any, low: int = 1) -> None:
    if type(value) is not int or value < low:
        raise _bad(name, value, f"an integer >= {low}")


def _check_float(name: str, value: Any, positive: bool = False, optional: bool = False) -> None:
    if optional and value is None:
        return
    if type(value) not in (int, float) or not math.isfinite(value) or (positive and value <= 0):
        raise _bad(name, value, "a finite positive number" if positive else "a finite number")


def _number(raw: Mapping[str, Any], key: str, kind: type, default: Any = None, name: str | None = None) -> Any:
    """raw[key] as `kind` (int or float); a one-line InputError for text, booleans and fractional ints.
    Ranges are checked by the dataclasses (one place for config.json and manifests alike)."""
    value = raw.get(key, default)
    if value is None:
        return None
    if type(value) not in (int, float) or (kind is int and not (math.isfinite(value) and value == int(value))):
        raise _bad(name or key, value, "an integer" if kind is int else "a number")
    return kind(value)


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

    def __post_init__(self) -> None:
        if type(self.factor) not in (int, float) or not math.isfinite(self.factor) or self.factor <= 1.0:
            raise InputError(f"YaRN needs a finite rope scaling factor > 1 (got {self.factor!r}): set "
                             "rope_scaling.factor in config.json or {opt:rope_factor}, e.g. 4.0")
        if self.original_max_position_embeddings is not None:
            _check_int("rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings)
        for name in ("beta_fast", "beta_slow"):
            _check_float(f"rope_scaling.{name}", getattr(self, name))
        for name in ("mscale", "mscale_all_dim", "attention_factor"):
            _check_float(f"rope_scaling.{name}", getattr(self, name), optional=True)


@dataclass(frozen=True)
class DualChunkConfig:
    """Dual Chunk Attention settings (`dual_chunk_attention_config`)."""

    chunk_size: int
    local_size: int
    original_max_position_embeddings: int = 0

    def __post_init__(self) -> None:
        _check_int("dual_chunk_attention_config.chunk_size", self.chunk_size, 2)
        _check_int("dual_chunk_attention_config.local_size", self.local_size)
        _check_int("dual_chunk_attention_config.original_max_position_embeddings",
                   self.original_max_position_embeddings, 0)
        if not 0 < self.local_size < self.chunk_size:
            raise InputError(
                f"DCA needs 0 < local_size < chunk_size (got local_size={self.local_size}, "
                f"chunk_size={self.chunk_size}): lower local_size or raise chunk_size"
            )

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

    def __post_init__(self) -> None:
        """Every field in range: bad values fail here in one line, not later as a crash."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            _check_int(name, getattr(self, name))
        _check_float("rms_norm_eps", self.rms_norm_eps, positive=True)
        _check_float("rope_theta", self.rope_theta, positive=True)
        _check_float("partial_rotary_factor", self.partial_rotary_factor, positive=True)
        if self.partial_rotary_factor > 1 or self.rotary_dim < 2:
            raise _bad("partial_rotary_factor", self.partial_rotary_factor,
                       f"at most 1 and leave at least 2 of head_dim {self.head_dim} channels rotated")
        if self.num_attention_heads % self.num_key_value_heads:
            raise InputError(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads}): fix config.json")
        for i in self.eos_token_id:
            _check_int("eos_token_id", i, 0)

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
    if type(factor) not in (int, float):
        raise InputError(f"YaRN needs a rope scaling factor > 1 (got {factor!r}): set rope_scaling.factor in "
                         "config.json or {opt:rope_factor}, e.g. 4.0")
    return RopeScaling(
        rope_type="yarn",
        factor=float(factor),
        original_max_position_embeddings=_number(raw, "original_max_position_embeddings", int,
                                                 name="rope_scaling.original_max_position_embeddings"),
        # transformers treats 0/None as "use the default".
        beta_fast=_number(raw, "beta_fast", float, name="rope_scaling.beta_fast") or 32.0,
        beta_slow=_number(raw, "beta_slow", float, name="rope_scaling.beta_slow") or 1.0,
        mscale=_number(raw, "mscale", float, name="rope_scaling.mscale"),
        mscale_all_dim=_number(raw, "mscale_all_dim", float, name="rope_scaling.mscale_all_dim"),
        attention_factor=_number(raw, "attention_factor", float, name="rope_scaling.attention_factor"),
        truncate=bool(raw.get("truncate", True)),
    )


def parse_dual_chunk(raw: Mapping[str, Any] | None) -> DualChunkConfig | None:
    """Read `dual_chunk_attention_config`; None when absent."""
    if not raw:
        return None
    if "chunk_size" not in raw or "local_size" not in raw:
        raise InputError("dual_chunk_attention_config is incomplete: give integer chunk_size and local_size")
    where = "dual_chunk_attention_config."
    return DualChunkConfig(
        chunk_size=_number(raw, "chunk_size", int, name=where + "chunk_size"),
        local_size=_number(raw, "local_size", int, name=where + "local_size"),
        original_max_position_embeddings=_number(raw, "original_max_position_embeddings", int, 0,
                                                 name=where + "original_max_position_embeddings") or 0,
    )


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
    rope_params = hf.get("rope_parameters") or {}
    if not isinstance(rope_params, Mapping):
        raise _bad("rope_parameters", rope_params, "an object")
    scaling_raw = hf.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default" else None)
    if scaling_raw is not None and not isinstance(scaling_raw, Mapping):
        raise _bad("rope_scaling", scaling_raw, "an object")
    if scaling_raw and hf.get("original_max_position_embeddings") is not None:
        # transformers gives a top-level original_max_position_embeddings priority over the dict's (Phi-3 style).
        scaling_raw = {**scaling_raw, "original_max_position_embeddings": hf["original_max_position_embeddings"]}
    dual_raw = hf.get("dual_chunk_attention_config")
    if dual_raw is not None and not isinstance(dual_raw, Mapping):
        raise _bad("dual_chunk_attention_config", dual_raw, "an object")
    heads = _number(hf, "num_attention_heads", int)
    hidden = _number(hf, "hidden_size", int)
    _check_int("num_attention_heads", heads)
    _check_int("hidden_size", hidden)
    head_dim = _number(hf, "head_dim", int) or (hidden // heads if hidden >= heads else None)
    if head_dim is None:
        raise _bad("hidden_size", hidden, f"a positive multiple of num_attention_heads ({heads}) when head_dim is unset")
    eos = hf.get("eos_token_id")
    eos_list = eos if isinstance(eos, list) else [eos] if eos is not None else []
    eos_ids = tuple(_number({"eos_token_id": e}, "eos_token_id", int) for e in eos_list)
    dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
    return ModelConfig(
        vocab_size=_number(hf, "vocab_size", int),
        hidden_size=hidden,
        intermediate_size=_number(hf, "intermediate_size", int),
        num_hidden_layers=_number(hf, "num_hidden_layers", int),
        num_attention_heads=heads,
        num_key_value_heads=heads if hf.get("num_key_value_heads") is None else _number(hf, "num_key_value_heads", int),
        head_dim=head_dim,
        rms_norm_eps=_number(hf, "rms_norm_eps", float, 1e-6),
        rope_theta=_number(rope_params, "rope_theta", float) or _number(hf, "rope_theta", float, 10000.0),
        partial_rotary_factor=(_number(rope_params, "partial_rotary_factor", float)
                               or _number(hf, "partial_rotary_factor", float, 1.0)),
        max_position_embeddings=_number(hf, "max_position_embeddings", int, 32768),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", True)),
        rope_scaling=parse_rope_scaling(scaling_raw),
        dual_chunk=parse_dual_chunk(dual_raw),
        bos_token_id=hf.get("bos_token_id") if type(hf.get("bos_token_id")) is int else None,  # unused; informative
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
