"""TensorRT optimization profiles computed from a bundle's I/O spec (pure Python).

Two profiles: `prefill` (seq 1..max_input_len, logits at up to max_logits positions) and `decode`
(seq = 1, one logit row). Kernels are tuned per profile at its `opt` shape, so splitting them lets
TensorRT pick decode kernels for the one-token GEMVs that dominate generation instead of
compromising with the prefill GEMMs. Every dynamic dimension of every input gets min/opt/max,
including attention_mask [batch, max_seq_len + seq] and logits_index [batch, n_logits].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .. import io_spec
from ..errors import InferenceError, InputError
from ..io_spec import IOSpec

PREFILL, DECODE = "prefill", "decode"
DEFAULT_MAX_INPUT_LEN = 1024
DEFAULT_MAX_LOGITS = 128
PREFILL_OPT_SEQ = 128  # a typical chat prompt; TensorRT still accepts 1..max

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """One optimization profile: per input name, (min, opt, max) shapes."""

    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name,
                "shapes": {k: {"min": list(a), "opt": list(b), "max": list(c)} for k, (a, b, c) in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Profile":
        return cls(d["name"], {k: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for k, v in d["shapes"].items()})

    def accepts(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        """Whether every input shape lies within this profile's [min, max] box."""
        for name, (lo, _, hi) in self.shapes.items():
            s = tuple(shapes.get(name, ()))
            if len(s) != len(lo) or any(not a <= x <= b for x, a, b in zip(s, lo, hi)):
                return False
        return True


@dataclass(frozen=True)
class ProfileLimits:
    """The user-facing limits an engine is built for."""

    max_batch: int = 1
    max_input_len: int = DEFAULT_MAX_INPUT_LEN
    max_logits: int = DEFAULT_MAX_LOGITS


def resolve_limits(spec: IOSpec, max_batch: int = 1, max_input_len: int | None = None,
                   max_logits: int | None = None) -> ProfileLimits:
    """Validate --max-batch / --max-input-len / --max-logits against the bundle (one-line errors)."""
    if max_batch < 1:
        raise InputError(f"--max-batch must be at least 1, got {max_batch}: pass e.g. --max-batch 1")
    n = min(spec.max_seq_len, DEFAULT_MAX_INPUT_LEN) if max_input_len is None else max_input_len
    if not 1 <= n <= spec.max_seq_len:
        raise InputError(f"--max-input-len {n} must be within 1..{spec.max_seq_len} (the bundle's max_seq_len): "
                         f"pass --max-input-len {min(spec.max_seq_len, DEFAULT_MAX_INPUT_LEN)} or re-export with a "
                         "larger --max-seq-len")
    k = min(n, DEFAULT_MAX_LOGITS) if max_logits is None else max_logits
    if not 1 <= k <= n:
        raise InputError(f"--max-logits {k} must be within 1..{n} (--max-input-len): pass e.g. --max-logits {min(n, 128)}")
    return ProfileLimits(max_batch, n, k)


def _dims(spec: IOSpec, batch: int, seq: int, n_logits: int, t: io_spec.TensorSpec) -> Shape:
    # The TensorRT backend keeps one full-size device cache (it does not grow it like the host cache),
    # so past_len is pinned to max_seq_len.
    dims = {io_spec.BATCH: batch, io_spec.SEQ: seq, io_spec.N_LOGITS: n_logits, io_spec.PAST_LEN: spec.max_seq_len}
    try:
        return t.concrete_shape(dims)
    except KeyError:
        raise InputError(f"input {t.name} has a symbolic dimension this qwen2edge does not know ({t.shape}): "
                         "re-export the bundle with this qwen2edge version") from None


def _profile(spec: IOSpec, name: str, batch: tuple[int, int, int], seq: tuple[int, int, int],
             logits: tuple[int, int, int]) -> Profile:
    shapes = {}
    for t in spec.inputs:
        shapes[t.name] = tuple(_dims(spec, batch[i], seq[i], logits[i], t) for i in range(3))
    return Profile(name, shapes)  # type: ignore[arg-type]


def compute_profiles(spec: IOSpec, limits: ProfileLimits) -> list[Profile]:
    """[prefill, decode] profiles for this I/O spec and these limits."""
    b, n, k = limits.max_batch, limits.max_input_len, limits.max_logits
    opt_seq = min(n, PREFILL_OPT_SEQ)
    prefill = _profile(spec, PREFILL, (1, 1, b), (1, opt_seq, n), (1, 1, k))
    decode = _profile(spec, DECODE, (1, b, b), (1, 1, 1), (1, 1, 1))
    return [prefill, decode]


def select_profile(profiles: Sequence[Profile], shapes: Mapping[str, Sequence[int]]) -> int:
    """Index of the profile to run these input shapes with: decode for one-token steps, else the first
    that accepts them. Raises a one-line InferenceError naming the limit and the fix."""
    order = sorted(range(len(profiles)), key=lambda i: profiles[i].name != DECODE)
    for i in order:
        if profiles[i].accepts(shapes):
            return i
    ids = tuple(shapes.get(io_spec.INPUT_IDS, ()))
    li = tuple(shapes.get(io_spec.LOGITS_INDEX, ()))
    hi = {p.name: p.shapes[io_spec.INPUT_IDS][2] for p in profiles if io_spec.INPUT_IDS in p.shapes}
    lg = {p.name: p.shapes[io_spec.LOGITS_INDEX][2][1] for p in profiles if io_spec.LOGITS_INDEX in p.shapes}
    raise InferenceError(
        f"input_ids {ids} / logits_index {li} lie outside every profile of this engine (max [batch, seq] {hi}, "
        f"max logits {lg}): rebuild the engine with larger --max-batch / --max-input-len / --max-logits")
