"""Shared by the speculative / prefix-cache / chunked-prefill benchmarks: the bundles they run on."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # qwen2edge from this checkout

Log = Callable[[str], None]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def scratch(prefix: str) -> Path:
    """A temporary directory, removed when the script exits (a --tiny run exports 0.2-0.6 GB into it)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def default_bundle(max_seq_len: int = 1024, progress: Log = log) -> tuple[Path, Path]:
    """(model dir, fp32 bundle) of the default model; the 1024-slot bundle is the demo's cached one."""
    from qwen2edge.demo import cached_bundle
    from qwen2edge.exporter.gguf_convert import default_model_dir, ensure_default_model

    model_dir = ensure_default_model(progress=progress)
    suffix = "" if max_seq_len == 1024 else f"-{max_seq_len}"
    out = default_model_dir().parent / f"smollm2-135m-instruct-onnx-fp32{suffix}"
    return model_dir, cached_bundle(model_dir, out, progress, max_seq_len=max_seq_len)


def tiny_bundle(work: Path, max_seq_len: int = 1024, progress: Log = log) -> tuple[Path, Path]:
    """A 2-layer random Qwen2 with the Qwen tokenizer (for --tiny smoke runs)."""
    from qwen2edge.exporter.export import ExportOptions, export_bundle

    from tests.tiny_models import make_tiny_qwen2  # the checkout's root is on sys.path (above)

    model_dir, bundle = work / "tiny-model", work / f"tiny-bundle-{max_seq_len}"
    if not (bundle / "manifest.json").is_file():
        make_tiny_qwen2(model_dir, max_position_embeddings=max(512, max_seq_len))
        export_bundle(model_dir, bundle, ExportOptions(max_seq_len=max_seq_len, dtype="fp32"), progress=progress)
    return model_dir, bundle


def draft_bundles(model_dir: Path, work: Path, layers: int, progress: Log = log) -> dict[str, Path]:
    """Drafts sharing the target's tokenizer, built from `model_dir` (no download): a random-weight tiny
    Qwen2 with its vocabulary, and the target cut to its first `layers` layers (same weights, final norm
    and tied head)."""
    from qwen2edge.exporter.export import ExportOptions, export_bundle

    out = {}
    for name, make in (("random tiny", _random_tiny), (f"first {layers} layers", _first_layers)):
        src, bundle = work / f"{name.replace(' ', '-')}-model", work / f"{name.replace(' ', '-')}-bundle"
        if not (bundle / "manifest.json").is_file():
            progress(f"building the draft '{name}'")
            shutil.rmtree(src, ignore_errors=True)
            src.mkdir(parents=True)
            make(model_dir, src, layers)
            for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
                if (model_dir / f).is_file():
                    shutil.copyfile(model_dir / f, src / f)
            export_bundle(src, bundle, ExportOptions(max_seq_len=1024, dtype="fp32"), progress=progress)
        out[name] = bundle
    return out


def _random_tiny(model_dir: Path, out: Path, _layers: int) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = json.loads((model_dir / "config.json").read_text())
    small = Qwen2Config(vocab_size=cfg["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                        max_position_embeddings=cfg["max_position_embeddings"], rope_theta=cfg.get("rope_theta", 1e4),
                        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
                        pad_token_id=cfg.get("pad_token_id"))
    torch.manual_seed(0)
    Qwen2ForCausalLM(small).save_pretrained(out, safe_serialization=True)


def _first_layers(model_dir: Path, out: Path, layers: int) -> None:
    from safetensors.numpy import load_file, save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    cfg["max_window_layers"] = min(cfg.get("max_window_layers", layers), layers)
    weights = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        for k, v in load_file(f).items():
            parts = k.split(".")
            if "layers" in parts and int(parts[parts.index("layers") + 1]) >= layers:
                continue
            weights[k] = v
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def load_line() -> str:
    return f"{os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}"
