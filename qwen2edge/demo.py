"""`qwen2edge demo`: convert the embedded SmolLM2-135M-Instruct, export, validate, and answer a prompt."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from .errors import Qwen2EdgeError


def cached_bundle(model_dir: Path, bundle_dir: Path, progress: Callable[[str], None], max_seq_len: int = 1024) -> Path:
    """Export once; reuse a bundle whose manifest verifies, points at the same model and has the current
    schema (an older one still runs, but without what changed since, e.g. the growable cache)."""
    from . import io_spec
    from .exporter.export import ExportOptions, export_bundle
    from .runtime.bundle import Bundle

    try:
        bundle = Bundle.open(bundle_dir)
        if (bundle.manifest.source.get("model_dir") == str(model_dir.absolute())
                and bundle.manifest.schema_version == io_spec.SCHEMA_VERSION and bundle.max_seq_len == max_seq_len):
            progress(f"reusing bundle {bundle_dir}")
            return bundle_dir
    except Qwen2EdgeError:
        pass
    # The demo's own cache: a stale bundle there is replaced (anything else there is still refused).
    export_bundle(model_dir, bundle_dir, ExportOptions(max_seq_len=max_seq_len, dtype="fp32"), progress=progress,
                  overwrite=True)
    return bundle_dir


def run_demo(cache_dir: str | None, prompt: str, echo: Callable[[str], None],
             progress: Callable[[str], None], steps: int = 16) -> dict:
    """The main job end to end; raises ValidationError when the bundle disagrees with transformers."""
    from .exporter.gguf_convert import default_model_dir, ensure_default_model
    from .runtime import api
    from .runtime.sampling import SamplingParams
    from .validation.results import require_pass
    from .validation.validate import table, validate

    model_dir = ensure_default_model(cache_dir, progress=progress)
    root = default_model_dir(cache_dir).parent
    bundle_dir = cached_bundle(model_dir, root / "smollm2-135m-instruct-onnx-fp32", progress)
    report = validate(model_dir, bundle_dir, steps=steps, progress=progress)
    echo("\nValidation against transformers:")
    echo(table(report))
    echo(f"\nQ: {prompt}")
    t0 = time.perf_counter()
    result = api.generate(bundle_dir, prompt=prompt, chat=True, params=SamplingParams(max_new_tokens=64))
    echo(f"A: {result['text'].strip()}")
    t = result["timings"]
    echo(f"\n[{len(result['token_ids'])} tokens in {time.perf_counter() - t0:.2f}s; "
         f"decode {t['decode_tokens_per_s']:.1f} tok/s on ONNX Runtime; bundle {bundle_dir}]")
    require_pass(report)
    return {"answer": result["text"], "report": report.to_dict(), "bundle": str(bundle_dir)}
