"""The `qwen2edge` command line: thin click commands, each calling one library function.

Errors from the library (qwen2edge.errors) become one-line messages and exit codes; --verbose
shows the traceback. Heavy imports (torch, transformers) happen inside the commands that need them.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any, Callable

import click

from . import __version__
from .errors import InputError, Qwen2EdgeError, cli_spelling


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


# Library option names whose flag is not simply --name-with-dashes.
CLI_FLAGS = {"stop_strings": "--stop", "model_name": "--served-model-name", "long_prompt_tokens": "--long-prompt-tokens"}


def flag(name: str) -> str:
    """How the command line spells a library option."""
    return CLI_FLAGS.get(name) or cli_spelling(name)


class Qwen2EdgeGroup(click.Group):
    """Turns library errors into one line on stderr (options spelled as flags) and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Qwen2EdgeError as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                traceback.print_exc()
            _fail(exc.render(flag), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was left half-written", 130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # an unexpected bug: still one line unless --verbose
            if ctx.obj and ctx.obj.get("verbose"):
                traceback.print_exc()
            _fail(f"{type(exc).__name__}: {exc} (re-run with --verbose for the traceback and report it)", 1)


TRT_TARGETS = ["trt-10.3", "trt-10.13", "trt-10", "trt-11", "jetpack-6", "jetpack-7.0", "jetpack-7.2"]
# = qwen2edge.trt.support_matrix.TARGETS (tested); spelled out so `--help` needs no import


def progress(message: str) -> None:
    click.echo(message, err=True)


# ---- shared options (defined once) -------------------------------------------------------------

def backend_option(f: Callable) -> Callable:
    return click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True,
                        help="ONNX Runtime, or TensorRT (needs an engine from build-engine).")(f)


def overwrite_option(f: Callable) -> Callable:
    return click.option("--overwrite", is_flag=True,
                        help="Replace an earlier qwen2edge output there (a path holding anything else is never "
                             "replaced).")(f)


def sampling_options(f: Callable) -> Callable:
    opts = [
        click.option("--max-new-tokens", type=int, default=128, show_default=True),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 means greedy."),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 disables top-k."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
        click.option("--seed", type=int, default=None),
        click.option("--stop", "stop", multiple=True, help="Stop string (repeatable)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def sampling_params(kw: dict[str, Any]):
    from .runtime.sampling import SamplingParams

    return SamplingParams(max_new_tokens=kw.pop("max_new_tokens"), temperature=kw.pop("temperature"),
                          top_k=kw.pop("top_k"), top_p=kw.pop("top_p"),
                          repetition_penalty=kw.pop("repetition_penalty"), seed=kw.pop("seed"),
                          stop_strings=tuple(kw.pop("stop")))


def speculative_options(f: Callable) -> Callable:
    opts = [
        click.option("--speculative", type=click.Choice(["prompt-lookup", "draft"]), default=None,
                     help="Speculative decoding: draft tokens from n-grams of the prompt and text so far, or from "
                          "--draft; greedy output is unchanged, sampled output keeps its distribution."),
        click.option("--num-speculative-tokens", type=int, default=5, show_default=True,
                     help="Draft tokens verified per step."),
        click.option("--ngram", type=int, default=3, show_default=True,
                     help="Prompt lookup: longest n-gram matched."),
        click.option("--draft", type=click.Path(path_type=str), default=None,
                     help="Draft bundle (a smaller model with the same tokenizer); implies --speculative draft."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def speculative_config(kw: dict[str, Any]):
    """The SpeculativeConfig the speculative options ask for, or None (they are removed from kw)."""
    from .runtime.speculative import SpeculativeConfig

    method, k, ngram, draft = kw.pop("speculative"), kw.pop("num_speculative_tokens"), kw.pop("ngram"), kw.pop("draft")
    if method is None and draft is None:
        return None
    return SpeculativeConfig(method or "draft", k, ngram, draft).check()


# ---- commands -----------------------------------------------------------------------------------

@click.group(cls=Qwen2EdgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", is_flag=True, envvar="QWEN2EDGE_VERBOSE", help="Show tracebacks.")
@click.version_option(__version__, prog_name="qwen2edge")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Qwen2 checkpoints to ONNX / TensorRT, with a torch-free generation runtime."""
    ctx.obj = {"verbose": verbose}


@main.command()
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=str), help="Bundle directory.")
@click.option("--max-seq-len", type=int, default=None, help="KV-cache length (default min(model limit, 2048)).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--opset", type=int, default=17, show_default=True, help="Ignored with --quantize (needs 21).")
@click.option("--trt-check", type=click.Choice([*TRT_TARGETS, "none"]), default="trt-10.3", show_default=True,
              help="Lint the graph for this TensorRT target and report findings (never fails the export).")
@click.option("--rope-scaling", type=str, default=None,
              help="Override config.json's rope scaling: yarn, or none. [default: as in config.json]")
@click.option("--rope-factor", type=float, default=None, help="YaRN factor (> 1), e.g. 4.")
@click.option("--original-max-position-embeddings", type=int, default=None,
              help="YaRN's pre-extension length L0, e.g. 32768.")
@click.option("--dca-chunk-size", type=int, default=None, help="Dual Chunk Attention chunk size C.")
@click.option("--dca-local-size", type=int, default=None, help="Dual Chunk Attention local size w (< C).")
@click.option("--dca-original-max-position-embeddings", type=int, default=None,
              help="DCA temperature length L0 (0 disables the temperature).")
@click.option("--quantize", type=click.Choice(["int8", "int4"]), default=None,
              help="Weight-only quantization: blockwise DequantizeLinear (opset 21) feeding each MatMul.")
@click.option("--block-size", type=click.Choice(["32", "64", "128"]), default="32", show_default=True,
              help="Weights per quantization block (along the reduction axis).")
@click.option("--quantize-embeddings/--no-quantize-embeddings", default=True, show_default=True,
              help="Also quantize the lm_head (int8/int4) and the embedding table (int8).")
@click.option("--int4-weights", type=click.Choice(["asymmetric", "symmetric"]), default=None,
              help="int4 grid: asymmetric (uint4 + a zero point per block; best measured accuracy) or symmetric "
                   "(int4, no zero point: what TensorRT's parser takes). [default: asymmetric]")
@click.option("--int4-lm-head", type=click.Choice(["int8", "int4"]), default=None,
              help="The lm_head MatMul of an int4 bundle (int8: more accurate, more bytes). [default: int8]")
@click.option("--debug-hidden-states", is_flag=True,
              help="Debug export: also output every layer's hidden state (for `compare`); not for shipping.")
@overwrite_option
def export(model_dir: str, out_dir: str, max_seq_len: int | None, dtype: str, opset: int, trt_check: str,
           quantize: str | None, block_size: str, quantize_embeddings: bool, int4_weights: str | None,
           int4_lm_head: str | None, debug_hidden_states: bool, overwrite: bool, **long_context: Any) -> None:
    """Export a Qwen2 checkpoint directory to an ONNX bundle (YaRN / DCA / quantization optional)."""
    from .config import LongContextOverrides
    from .exporter.export import ExportOptions, export_bundle
    from .exporter.quantize import QuantizeOptions

    quant = QuantizeOptions.from_flags(quantize, int(block_size), quantize_embeddings, int4_weights, int4_lm_head)
    options = ExportOptions(max_seq_len=max_seq_len, dtype=dtype, opset=opset,
                            trt_check=None if trt_check == "none" else trt_check, quantize=quant,
                            debug_hidden_states=debug_hidden_states, long_context=LongContextOverrides(**long_context))
    export_bundle(model_dir, out_dir, options, progress=progress, overwrite=overwrite)


def engine_limit_options(f: Callable) -> Callable:
    opts = [
        click.option("--max-batch", type=int, default=1, show_default=True, help="Largest batch the engine accepts."),
        click.option("--max-input-len", type=int, default=None,
                     help="Longest prompt (prefill) in tokens (default min(max_seq_len, 1024))."),
        click.option("--max-logits", type=int, default=None,
                     help="Most positions with logits per prefill (default min(max-input-len, 128); validate needs "
                          "the prompt length)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@main.command("build-engine")
@click.argument("bundle_dir", type=click.Path(path_type=str))
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Default: the ONNX's dtype. TensorRT 11 accepts only that; TensorRT 10 can lower an fp32 ONNX.")
@engine_limit_options
@click.option("--workspace", "workspace_mib", type=int, default=None, help="Builder workspace limit in MiB.")
@click.option("--timing-cache", type=click.Path(path_type=str), default=None,
              help="Read/write TensorRT's timing cache here (faster rebuilds).")
@click.option("--opt-level", type=int, default=None, help="Builder optimization level 0-5 (TensorRT default 3).")
@click.option("--tf32", is_flag=True, help="Let an fp32 build use TF32 matmuls (off by default: fp32 engines are "
                                           "validated against PyTorch's fp32).")
@overwrite_option
def build_engine(bundle_dir: str, precision: str | None, max_batch: int, max_input_len: int | None,
                 max_logits: int | None, workspace_mib: int | None, timing_cache: str | None,
                 opt_level: int | None, tf32: bool, overwrite: bool) -> None:
    """Build a TensorRT engine for this device into BUNDLE_DIR/engine (needs TensorRT and a GPU)."""
    from .trt.builder import EngineOptions, build_engine as run

    run(bundle_dir, EngineOptions(precision=precision, max_batch=max_batch, max_input_len=max_input_len,
                                  max_logits=max_logits, workspace_mib=workspace_mib, timing_cache=timing_cache,
                                  opt_level=opt_level, tf32=tf32, overwrite=overwrite), progress=progress)


@main.command()
@click.argument("path", type=click.Path(path_type=str))
@click.option("--target", type=click.Choice(TRT_TARGETS), default="trt-10.3", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def check(path: str, target: str, as_json: bool) -> None:
    """Lint an export (or .onnx) against a TensorRT target's ONNX parser rules; no TensorRT needed."""
    from .trt.compat import check_bundle, require_compatible

    report = check_bundle(path, target)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        click.echo("\n".join([report.summary(), *report.lines()]))
    require_compatible(report)


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=str))
@click.option("-o", "--output", "out_file", required=True, type=click.Path(path_type=str), help="FILE.tar.gz")
@overwrite_option
def bundle(bundle_dir: str, out_file: str, overwrite: bool) -> None:
    """Pack an export for a device: model, tokenizer, manifests, requirements, README, runtime wheel."""
    from .device_bundle import pack_bundle

    pack_bundle(bundle_dir, out_file, progress=progress, overwrite=overwrite)


@main.command()
@click.argument("archive", type=click.Path(path_type=str))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=str), help="Directory.")
@overwrite_option
def unbundle(archive: str, out_dir: str, overwrite: bool) -> None:
    """Verify (checksums, safe paths, only manifest-listed files) and unpack a device bundle."""
    from .device_bundle import unpack_bundle

    unpack_bundle(archive, out_dir, progress=progress, overwrite=overwrite)


@main.command("plan-memory")
@click.argument("bundle_dir", type=click.Path(path_type=str))
@engine_limit_options
@click.option("--workspace", "workspace_mib", type=int, default=None, help="Builder workspace limit in MiB.")
@click.option("--json", "as_json", is_flag=True)
def plan_memory(bundle_dir: str, max_batch: int, max_input_len: int | None, max_logits: int | None,
                workspace_mib: int | None, as_json: bool) -> None:
    """Estimate unified-memory use (weights + KV cache + activations + workspace) per Jetson module."""
    from .memory_plan import plan_memory as run

    plan = run(bundle_dir, max_batch, max_input_len, max_logits, workspace_mib)
    click.echo(json.dumps(plan.to_dict()) if as_json else plan.table())


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=str))
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--prompt-ids", default=None, help="Comma-separated token ids instead of text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the bundle's chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@sampling_options
@speculative_options
@backend_option
def generate(bundle_dir: str, prompt: str | None, prompt_ids: str | None, chat: bool, as_json: bool,
             backend: str, **kw: Any) -> None:
    """Generate text from an exported bundle."""
    from .runtime import api

    ids = api.parse_prompt_ids(prompt_ids) if prompt_ids is not None else None
    if prompt is None and ids is None:
        raise InputError("give --prompt TEXT or --prompt-ids 1,2,3")
    stream = None if as_json else (lambda delta: (sys.stdout.write(delta), sys.stdout.flush()))
    speculative = speculative_config(kw)
    result = api.generate(bundle_dir, prompt=prompt, prompt_ids=ids, chat=chat, params=sampling_params(kw),
                          backend=backend, on_text=stream, speculative=speculative)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
    else:
        click.echo()
        t = result["timings"]
        spec = result.get("speculative")
        accepted = f", {spec['accepted']}/{spec['drafted']} drafts accepted" if spec else ""
        progress(f"[{len(result['token_ids'])} tokens, prefill {t['prefill_s'] * 1000:.0f} ms, "
                 f"{t['decode_tokens_per_s']:.1f} tok/s{accepted}, finish: {result['finish_reason']}]")


def accuracy_options(f: Callable) -> Callable:
    """Options `validate` and `compare` share (one engine, validation/engine.py)."""
    opts = [
        click.option("--steps", type=click.IntRange(1, 4096), default=32, show_default=True,
                     help="Teacher-forced decode steps and greedy tokens compared per prompt."),
        click.option("--long-prompt-tokens", type=int, default=0, show_default=True,
                     help="Add a prompt of this many tokens (reach past YaRN's L0 or DCA's chunk period)."),
        click.option("--threshold", "thresholds", multiple=True, metavar="KEY=VALUE",
                     help="Override a pass/fail bound (repeatable), e.g. --threshold max_abs=0.1."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (report.json's schema)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@main.command()
@click.argument("model_dir", type=click.Path(path_type=str))
@click.argument("bundle_dir", type=click.Path(path_type=str))
@accuracy_options
@backend_option
def validate(model_dir: str, bundle_dir: str, steps: int, long_prompt_tokens: int, thresholds: tuple[str, ...],
             as_json: bool, backend: str) -> None:
    """Quick accuracy check of a bundle against its reference (compare's engine, three prompts)."""
    from .validation.results import require_pass
    from .validation.thresholds import parse_overrides
    from .validation.validate import table, validate as run

    result = run(model_dir, bundle_dir, steps=steps, backend=backend, long_prompt_tokens=long_prompt_tokens,
                 overrides=parse_overrides(thresholds), progress=progress)
    click.echo(json.dumps(result.to_dict(), ensure_ascii=False) if as_json else table(result))
    require_pass(result)


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=str))
@backend_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface; 0.0.0.0 exposes the server.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--max-concurrency", type=int, default=8, show_default=True, help="Requests generating at once.")
@click.option("--max-batch", type=int, default=None,
              help="Rows per backend batch. [default: 8, or the TensorRT engine's largest batch if smaller]")
@click.option("--batching", type=click.Choice(["in-flight", "static"]), default="in-flight", show_default=True,
              help="in-flight: requests join and leave a running batch between decode steps; static: a batch "
                   "runs until its last row ends (TensorRT always runs static batches).")
@click.option("--max-queue", type=int, default=64, show_default=True,
              help="Requests waiting for a slot; beyond it, 429 with Retry-After.")
@click.option("--api-key", default=None, envvar="QWEN2EDGE_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 (or set QWEN2EDGE_API_KEY).")
@click.option("--served-model-name", "model_name", default=None, help="Model id clients send (default: dir name).")
@click.option("--shutdown-timeout", type=float, default=30.0, show_default=True,
              help="Seconds SIGINT/SIGTERM waits for in-flight requests before cancelling them.")
@speculative_options
@click.option("--prefix-cache-mb", type=int, default=256, show_default=True,
              help="Memory for keys/values of finished requests, reused by prompts that start the same way (the "
                   "next chat turn, a shared system prompt); 0 turns it off. In-flight batching only.")
@click.option("--prefill-chunk", type=int, default=32, show_default=True,
              help="Positions per step while a prompt joins running requests: it is prefilled in chunks between "
                   "their tokens; 0 prefills it at once. In-flight batching only.")
def serve(bundle_dir: str, **settings: Any) -> None:
    """Serve a bundle over an OpenAI-compatible HTTP API (needs the `serve` extra)."""
    from .serve.server import serve as run
    from .serve.settings import ServeSettings

    run(bundle_dir, ServeSettings(**settings), progress=progress)


@main.command("triton-repo")
@click.argument("bundle_dir", type=click.Path(path_type=str))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=str),
              help="Model repository directory (tritonserver --model-repository).")
@click.option("--name", default="qwen2edge", show_default=True, help="Triton model name.")
@click.option("--instances", type=int, default=1, show_default=True,
              help="Model instances (each a process with its own copy of the model).")
@backend_option
@click.option("--max-batch", type=int, default=None,
              help="Requests one instance batches at once; more wait in Triton's queue for a free instance "
                   "[default: 8; TensorRT: the engine's max batch].")
@click.option("--threads", type=int, default=0, show_default=True,
              help="ONNX Runtime threads per instance; 0 = every core.")
@click.option("--streaming/--no-streaming", default=True, show_default=True,
              help="Decoupled model: /generate_stream and gRPC streaming, but Triton refuses plain /infer for it. "
                   "--no-streaming: one response per request, /infer over HTTP and gRPC (KServe v2) works.")
@click.option("--python-path", default=None,
              help="Directories (os.pathsep-separated) model.py adds to sys.path to import qwen2edge; '' for "
                   "none (qwen2edge installed in Triton's Python). [default: this environment's site-packages]")
@click.option("--copy-bundle", is_flag=True, help="Copy the bundle into the repository (self-contained, e.g. "
              "for object storage) instead of recording its path.")
@overwrite_option
def triton_repo(bundle_dir: str, out_dir: str, overwrite: bool, **options: Any) -> None:
    """Write a Triton Inference Server model repository serving BUNDLE_DIR (see docs/triton.md)."""
    from .triton.repo import RepoOptions, write_triton_repo

    write_triton_repo(bundle_dir, out_dir, RepoOptions(**options), progress=progress, overwrite=overwrite)


@main.command()
@click.argument("model_dir", type=click.Path(path_type=str))
@click.argument("bundle_dir", metavar="OUT_DIR", type=click.Path(path_type=str))
@click.option("--backend", "backends", multiple=True, type=click.Choice(["ort", "trt", "ort-graph"]),
              help="Backend to compare (repeatable; default ort). trt needs TensorRT and a GPU. Quantized bundles "
                   "also run ort-graph, the graph's own arithmetic.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=str), default=None,
              help="JSONL prompt file (format in docs/compare.md); default: the built-in set.")
@click.option("--report", "report_dir", type=click.Path(path_type=str), default=None,
              help="Report directory (default: compare-<bundle name> in the current directory).")
@click.option("--no-layers", is_flag=True, help="Skip per-layer drift (saves a debug re-export).")
@accuracy_options
@overwrite_option
def compare(model_dir: str, bundle_dir: str, backends: tuple[str, ...], prompts_file: str | None, steps: int,
            long_prompt_tokens: int, report_dir: str | None, thresholds: tuple[str, ...], no_layers: bool,
            as_json: bool, overwrite: bool) -> None:
    """Accuracy report: each backend vs the reference, per step and per layer; exit 5 on failure."""
    from .validation.compare import compare_to_report
    from .validation.report import summary_table
    from .validation.results import require_pass

    result, out = compare_to_report(model_dir, bundle_dir, backends, prompts_file, steps, report_dir, thresholds,
                                    layers=not no_layers, long_prompt_tokens=long_prompt_tokens, progress=progress,
                                    overwrite=overwrite)
    report = result.to_dict()
    click.echo(json.dumps(report, ensure_ascii=False) if as_json else summary_table(report))
    require_pass(result, out)


@main.command()
@click.option("--cache-dir", type=click.Path(path_type=str), default=None, envvar="QWEN2EDGE_CACHE",
              help="Where the converted model and bundle are cached.")
@click.option("--prompt", default="What is the capital of France?", show_default=True)
def demo(cache_dir: str | None, prompt: str) -> None:
    """The whole job on the embedded SmolLM2-135M-Instruct: convert, export, validate, answer."""
    from .demo import run_demo

    run_demo(cache_dir=cache_dir, prompt=prompt, echo=click.echo, progress=progress)


if __name__ == "__main__":  # pragma: no cover
    main()
