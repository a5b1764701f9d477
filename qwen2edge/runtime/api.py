"""`qwen2edge generate`: bundle dir and prompt in, result dict out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import InputError
from .bundle import Bundle
from .sampling import SamplingParams
from .speculative import SpeculativeConfig, speculator_factory


def parse_prompt_ids(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3], with a one-line error for anything else."""
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise InputError(f"{{opt:prompt_ids}} must be comma-separated integers, got {text!r}: e.g. 1,2,3") from None
    if not ids:
        raise InputError("{opt:prompt_ids} is empty: give at least one token id, e.g. 1,2,3")
    return ids


def encode_prompt(bundle: Bundle, prompt: str | None, prompt_ids: Sequence[int] | None, chat: bool,
                  system: str | None = None) -> list[int]:
    """Token ids for a text prompt (optionally through the chat template) or explicit ids."""
    if (prompt is None) == (prompt_ids is None):
        raise InputError("give exactly one of {opt:prompt} or {opt:prompt_ids}")
    if prompt_ids is not None:
        bad = [i for i in prompt_ids if not 0 <= i < bundle.config.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary (0..{bundle.config.vocab_size - 1}): "
                             "fix {opt:prompt_ids}")
        return list(prompt_ids)
    text = bundle.tokenizer.chat_prompt(prompt, system=system) if chat else prompt
    return bundle.tokenizer.encode(text)


def generate(bundle_dir: str | Path, prompt: str | None = None, prompt_ids: Sequence[int] | None = None,
             chat: bool = False, params: SamplingParams = SamplingParams(), backend: str = "ort",
             on_text: Callable[[str], None] | None = None,
             speculative: SpeculativeConfig | None = None) -> dict[str, Any]:
    """Generate for one prompt; returns prompt_ids, token_ids, text, finish_reason and timings (and, with
    speculative decoding, how many draft tokens were verified and accepted)."""
    t0 = time.perf_counter()
    bundle = Bundle.open(bundle_dir)
    gen = bundle.generator(backend)
    make_speculator = speculator_factory(speculative, bundle, gen)
    load_s = time.perf_counter() - t0
    ids = encode_prompt(bundle, prompt, prompt_ids, chat)
    callback = (lambda _row, delta: on_text(delta)) if on_text else None
    speculator = make_speculator() if make_speculator else None
    results, timings = gen.generate([ids], params, on_text=callback, speculator=speculator)
    r = results[0]
    out = {"prompt_ids": ids, "token_ids": r.token_ids, "text": r.text, "finish_reason": r.finish_reason,
           "timings": {"load_s": round(load_s, 3), **timings.to_dict()}}
    if speculator is not None:
        out["speculative"] = {"method": speculator.method, "drafted": r.drafted, "accepted": r.accepted}
    return out
