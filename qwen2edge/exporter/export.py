"""Checkpoint -> ONNX bundle: trace graphs/, check the graph, write model + tokenizer + manifest atomically."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import __version__, io_spec
from ..config import LongContextOverrides, ModelConfig, load_hf_config, resolve_long_context
from ..errors import ExportError, InputError
from ..bundle_manifest import BUNDLE_KIND, BundleManifest, LongContextRecord, QuantizationRecord
from ..manifest import atomic_directory, prepare_output
from .quantize import QUANT_OPSET, TRACE_OPSET, QuantizeOptions, quantize_model

DEFAULT_OPSET = 17  # parsed by TensorRT 10.3 (JetPack 6) and every later release
DEFAULT_MAX_SEQ_LEN = 2048
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
PROTOBUF_LIMIT = 2 * 1024**3 - 1024**2  # leave head-room under protobuf's 2 GiB
# The longest cache an export accepts: 4x Qwen2.5-1M's context. DCA has no rotary limit of its own, and
# --max-seq-len 10**9 once ran an export into the OOM killer; no edge device holds a cache this long anyway.
MAX_SEQ_LEN_LIMIT = 1 << 22
TRACE_PAST_LEN = 5  # cache slots in the trace's sample inputs: past_len is a graph dimension, any size traces


@dataclass(frozen=True)
class ExportOptions:
    """What `qwen2edge export` was asked for."""

    max_seq_len: int | None = None
    dtype: str = "fp32"
    opset: int = DEFAULT_OPSET
    trt_check: str | None = "trt-10.3"  # TensorRT compatibility lint target; None skips it
    long_context: LongContextOverrides = LongContextOverrides()  # changes to config.json's rope/DCA settings
    # Debug exports add hidden_state.{i} outputs (per-layer drift in `qwen2edge compare`); slower, not for shipping.
    debug_hidden_states: bool = False
    quantize: QuantizeOptions | None = None  # weight-only int8/int4 (exporter/quantize.py)

    def check(self) -> None:
        """Refuse bad options before minutes of loading and tracing."""
        if self.dtype not in io_spec.ONNX_ELEM:
            raise InputError(f"unknown dtype {self.dtype!r}: pass {{opt:dtype}} fp32, fp16 or bf16")
        if not 7 <= self.opset <= 23:
            raise InputError(f"{{opt:opset}} {self.opset} is outside 7..23: use the default ({DEFAULT_OPSET})")
        if self.trt_check:
            from ..trt.compat import get_target

            get_target(self.trt_check)
        if self.quantize is not None:
            self.quantize.check()
            if self.dtype != "fp32":
                raise InputError(f"{{opt:quantize}} needs {{opt:dtype}} fp32 activations (got {self.dtype}): drop "
                                 "{opt:dtype}")


Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def resolve_max_seq_len(cfg: ModelConfig, requested: int | None) -> int:
    """Validate --max-seq-len against what the model's rotary setup supports.

    Plain RoPE: max_position_embeddings; YaRN: L0 * factor; DCA: any length (its rotary indices
    never exceed chunk_size, checked in config.resolve_long_context)."""
    if requested is not None and requested > MAX_SEQ_LEN_LIMIT:
        kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * requested / 2**30
        raise InputError(f"{{opt:max_seq_len}} {requested} is beyond qwen2edge's limit of {MAX_SEQ_LEN_LIMIT} tokens "
                         f"(one sequence's fp16 KV cache alone would take {kv:,.0f} GiB): pass {{opt:max_seq_len}} "
                         f"{MAX_SEQ_LEN_LIMIT} or less")
    if cfg.dual_chunk is not None:
        if requested is not None and requested <= 0:
            raise InputError(f"--max-seq-len must be positive, got {requested}: pass e.g. --max-seq-len 2048")
        return requested or DEFAULT_MAX_SEQ_LEN
    limit = cfg.max_position_embeddings
    if cfg.rope_scaling is not None:
        l0 = cfg.rope_scaling.original_max_position_embeddings or cfg.max_position_embeddings
        limit = max(limit, int(l0 * cfg.rope_scaling.factor))
    if requested is None:
        return min(limit, DEFAULT_MAX_SEQ_LEN)
    if requested <= 0:
        raise InputError(f"--max-seq-len must be positive, got {requested}: pass e.g. --max-seq-len 2048")
    if requested > limit:
        raise InputError(
            f"--max-seq-len {requested} exceeds what this model supports (its rotary table covers {limit} positions): "
            f"pass --max-seq-len {limit} or less, or extend the context with --rope-scaling yarn --rope-factor F "
            "or Dual Chunk Attention (--dca-chunk-size/--dca-local-size)"
        )
    return requested


def io_spec_for(cfg: ModelConfig, max_seq_len: int, dtype: str, hidden_states: bool = False) -> io_spec.IOSpec:
    """The graph's I/O contract for this config (single source: qwen2edge.io_spec)."""
    return io_spec.build_io_spec(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size,
                                 max_seq_len, dtype, dca=cfg.dual_chunk is not None,
                                 hidden_states=hidden_states, hidden_size=cfg.hidden_size)


def sample_inputs(spec: io_spec.IOSpec, batch: int = 2, seq: int = 3) -> dict[str, np.ndarray]:
    """Feeds of the right names/dtypes/shapes (batch and seq > 1 so the trace specializes neither)."""
    import torch

    # Schema 2's past_len is a graph dimension: a short sample cache traces the same graph as a full one,
    # without allocating max_seq_len slots per layer (a 1M-token export would need hundreds of GiB).
    past = spec.max_seq_len if not spec.growable_cache else min(spec.max_seq_len, TRACE_PAST_LEN)
    dims = {io_spec.BATCH: batch, io_spec.SEQ: seq, io_spec.N_LOGITS: 1, io_spec.PAST_LEN: past}
    feeds: dict[str, Any] = {}
    for t in spec.inputs:
        shape = t.concrete_shape(dims)
        dtype = getattr(torch, t.dtype)  # element type names are torch's dtype names too
        feeds[t.name] = torch.ones(shape, dtype=dtype) if t.dtype == "int64" else torch.zeros(shape, dtype=dtype)
    feeds[io_spec.POSITION_IDS] = torch.arange(seq).repeat(batch, 1)
    feeds[io_spec.LOGITS_INDEX] = torch.full((batch, 1), seq - 1, dtype=torch.int64)
    if spec.dca:
        feeds[io_spec.DCA_SCALE] = torch.ones(batch, dtype=torch.float32)
    return feeds


def long_context_record(cfg: ModelConfig, max_seq_len: int, options: ExportOptions,
                        notes: list[str]) -> LongContextRecord:
    """The effective long-context settings for manifest.json."""
    from ..positions.dca import describe

    if cfg.dual_chunk is not None:
        mode, summary = "dca", describe(cfg.dual_chunk)
        if max_seq_len <= cfg.dual_chunk.period:
            notes.append(f"max_seq_len {max_seq_len} <= DCA period {cfg.dual_chunk.period}: DCA never leaves the "
                         "first chunk and equals plain attention")
    elif cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        l0 = rs.original_max_position_embeddings or cfg.max_position_embeddings
        mode, summary = "yarn", f"YaRN factor {rs.factor:g} over L0={l0} (truncate={rs.truncate})"
    else:
        mode, summary = "plain", "plain RoPE"
    as_dict = cfg.to_dict()
    return LongContextRecord(mode=mode, summary=summary, overrides=options.long_context.given(), notes=tuple(notes),
                             rope_scaling=as_dict["rope_scaling"], dual_chunk=as_dict["dual_chunk"])


def build_graph(model_dir: Path, cfg: ModelConfig, max_seq_len: int, dtype: str, hidden_states: bool = False):
    """Qwen2Graph with the checkpoint's weights, cast to `dtype`."""
    from ..graphs.model import Qwen2Graph
    from .checkpoint import load_graph_weights

    graph = Qwen2Graph(cfg, max_seq_len, dtype, expose_hidden_states=hidden_states)
    load_graph_weights(graph, cfg, model_dir)
    return graph.cast_weights().eval()


def trace_to_onnx(graph, spec: io_spec.IOSpec, path: Path, opset: int) -> None:
    """torch.onnx (TorchScript exporter: explicit opset, dynamic_axes, plain ai.onnx ops)."""
    import torch

    feeds = sample_inputs(spec)
    args = tuple(feeds[n] for n in spec.input_names)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, args, str(path), dynamo=False, opset_version=opset,
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(), do_constant_folding=True,
        )


def finalize_model(path: Path, transform: Callable[[Any], Any] | None = None) -> Any:
    """Check the traced graph, refuse custom domains, apply `transform` (e.g. quantization) to it,
    run the ONNX checker, and store weights externally when the protobuf would exceed 2 GiB.
    Returns what `transform` returned."""
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    bad = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if bad:
        raise ExportError(f"the exported graph uses non-standard op domains {bad}: report this as a qwen2edge bug")
    result = transform(model) if transform is not None else None
    for f in path.parent.iterdir():
        if f != path:
            f.unlink()  # loose tensor files from the tracer; re-saved below
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size > PROTOBUF_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises several unrelated types here
        raise ExportError(f"the ONNX checker rejected the exported graph ({str(exc).splitlines()[0]}): "
                          "report this as a qwen2edge bug") from exc
    return result


def report_trt_compat(path: Path, target: str | None, progress: Progress) -> None:
    """Lint the graph for TensorRT (no TensorRT needed) and report findings; never fails the export."""
    if not target:
        return
    from ..trt.compat import lint_path

    report = lint_path(path, target)
    progress(f"      TensorRT check: {report.summary()}")
    for line in report.lines():
        progress(f"        {line}")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shaped the artifact."""
    from importlib import metadata

    out = {"qwen2edge": __version__}
    for name in ("torch", "onnx", "onnxruntime", "transformers", "tokenizers", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def check_tokenizer_source(model_dir: Path) -> None:
    """The checkpoint's tokenizer files load and parse (a bad one is refused, not copied into the bundle)."""
    if not (model_dir / "tokenizer.json").is_file():
        raise InputError(f"{model_dir} has no tokenizer.json: copy the model's tokenizer.json (and "
                         "tokenizer_config.json) into that directory and export again")
    from ..runtime.tokenizer import check_tokenizer_files

    check_tokenizer_files(model_dir)


def copy_tokenizer(model_dir: Path, dest: Path) -> list[str]:
    """Copy tokenizer and generation config files (checked by check_tokenizer_source)."""
    copied = []
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, dest / name)
            copied.append(name)
    return copied


@dataclass(frozen=True)
class ExportPlan:
    """What an export will produce, resolved from config.json and the options before any slow work."""

    cfg: ModelConfig  # long-context overrides applied and resolved
    max_seq_len: int
    spec: io_spec.IOSpec
    long_context: LongContextRecord


def plan_export(model_dir: Path, options: ExportOptions, cfg_override: ModelConfig | None = None) -> ExportPlan:
    """Read config.json (or take `cfg_override`), apply and resolve the long-context overrides, size the cache."""
    cfg = cfg_override or load_hf_config(model_dir)[0]
    cfg, notes = resolve_long_context(options.long_context.apply(cfg))
    max_seq_len = resolve_max_seq_len(cfg, options.max_seq_len)
    spec = io_spec_for(cfg, max_seq_len, options.dtype, options.debug_hidden_states)
    return ExportPlan(cfg, max_seq_len, spec, long_context_record(cfg, max_seq_len, options, notes))


def graph_transform(cfg: ModelConfig, options: ExportOptions,
                    progress: Progress) -> Callable[[Any], dict[str, Any] | None] | None:
    """What to do to the traced graph before it is saved: quantize its weights, or store a tied
    embedding once; the callable returns the quantization record, if any."""
    q = options.quantize
    if q is not None:
        def quantize(model: Any) -> dict[str, Any]:
            progress(f"  quantizing weights to {q.scheme} (block {q.block_size}, "
                     f"embeddings {'included' if q.embeddings else 'kept float'})")
            return quantize_model(model, q, cfg.vocab_size, progress)

        return quantize
    if cfg.tie_word_embeddings:
        from .tied import share_tied_embedding

        def share(model: Any) -> None:
            share_tied_embedding(model, progress)

        return share
    return None


def export_bundle(model_dir: str | Path, out_dir: str | Path, options: ExportOptions = ExportOptions(),
                  progress: Progress = _quiet, cfg_override: ModelConfig | None = None,
                  overwrite: bool = False) -> BundleManifest:
    """Export MODEL_DIR to an ONNX bundle in OUT_DIR (atomically); returns its manifest. OUT_DIR must be new,
    empty, or (with `overwrite`) an earlier artifact, and never MODEL_DIR or a directory holding it."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    options.check()
    plan = plan_export(model_dir, options, cfg_override)
    check_tokenizer_source(model_dir)
    # Before minutes of loading and tracing:
    prepare_output(out_dir, overwrite, inputs=(model_dir,), progress=progress, kind=BUNDLE_KIND)
    for note in plan.long_context.notes:
        progress(f"note: {note}")
    t0 = time.perf_counter()
    progress(f"[1/4] loading {model_dir} ({plan.cfg.num_hidden_layers} layers, hidden {plan.cfg.hidden_size}; "
             f"{plan.long_context.summary})")
    graph = build_graph(model_dir, plan.cfg, plan.max_seq_len, options.dtype, options.debug_hidden_states)
    # Blockwise DequantizeLinear needs opset 21; the tracer stops at 20, and 20 -> 21 only widened types.
    trace_opset, opset = (TRACE_OPSET, QUANT_OPSET) if options.quantize else (options.opset, options.opset)
    with atomic_directory(out_dir, overwrite, inputs=(model_dir,), progress=progress, kind=BUNDLE_KIND) as tmp:
        copied = copy_tokenizer(model_dir, tmp)
        work = tmp / ".onnx-work"
        work.mkdir()
        progress(f"[2/4] tracing to ONNX (opset {trace_opset}, {options.dtype}, max_seq_len {plan.max_seq_len})")
        trace_to_onnx(graph, plan.spec, work / MODEL_FILE, trace_opset)
        del graph  # the traced weights are in the ONNX file now
        progress("[3/4] checking the graph (ONNX checker, shape inference, op domains)")
        quant = finalize_model(work / MODEL_FILE, graph_transform(plan.cfg, options, progress))
        report_trt_compat(work / MODEL_FILE, options.trt_check, progress)
        for f in work.iterdir():
            os.replace(f, tmp / f.name)
        work.rmdir()
        progress("[4/4] writing manifest.json with checksums")
        manifest = BundleManifest(
            model_file=MODEL_FILE, dtype=options.dtype, opset=opset, max_seq_len=plan.max_seq_len,
            model_config=plan.cfg, io_spec=plan.spec, long_context=plan.long_context,
            quantization=QuantizationRecord.from_dict(quant), debug_hidden_states=options.debug_hidden_states,
            tokenizer_files=tuple(copied), source={"model_dir": str(model_dir.absolute())},
            library_versions=library_versions(), export_seconds=round(time.perf_counter() - t0, 2),
        ).write(tmp)
    progress(f"done in {time.perf_counter() - t0:.1f}s -> {out_dir}")
    return manifest
