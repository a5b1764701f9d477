"""The `qwen2edge` command line: thin click commands, each calling one library function.

Errors from the library (qwen2edge.errors) become one-line messages and exit codes; --verbose
shows the traceback. Heavy imports (torch, transformers) happen inside the commands that need them.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from typing import Any, Callable

import click

from . import __version__
from .errors import InputError, Qwen2EdgeError


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class Qwen2EdgeGroup(click.Group):
    """Turns library errors into one line on stderr and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Qwen2EdgeError as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                traceback.print_exc()
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was left half-written", 130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # an unexpected bug: still one line unless --verbose
            if ctx.obj and ctx.obj.get("verbose"):
                traceback.print_exc()
            _fail(f"{type(exc).__name__}: {exc} (re-run with --verbose for the traceback and report it)", 1)


def progress(message: str) -> None:
    click.echo(message, err=True)


# ---- shared options (defined once) -------------------------------------------------------------

def backend_option(f: Callable) -> Callable:
    return click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True,
                        help="ONNX Runtime, or TensorRT (needs an engine from build-engine).")(f)


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
@click.option("--quantize", type=click.Choice(["int8", "int4"]), default=None,
              help="Weight-only quantization: blockwise DequantizeLinear (opset 21) feeding each MatMul.")
@click.option("--block-size", type=click.Choice(["32", "64", "128"]), default="32", show_default=True,
              help="Weights per quantization block (along the reduction axis).")
@click.option("--quantize-embeddings/--no-quantize-embeddings", default=True, show_default=True,
              help="Also quantize the lm_head (int8/int4) and the embedding table (int8).")
def export(model_dir: str, out_dir: str, max_seq_len: int | None, dtype: str, opset: int, quantize: str | None,
           block_size: str, quantize_embeddings: bool) -> None:
    """Export a Qwen2 checkpoint directory to an ONNX bundle."""
    from .exporter.export import ExportOptions, export_bundle
    from .exporter.quantize import QuantizeOptions

    quant = QuantizeOptions(quantize, int(block_size), quantize_embeddings) if quantize else None
    export_bundle(model_dir, out_dir, ExportOptions(max_seq_len=max_seq_len, dtype=dtype, opset=opset, quantize=quant),
                  progress=progress)


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=str))
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--prompt-ids", default=None, help="Comma-separated token ids instead of text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the bundle's chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@sampling_options
@backend_option
def generate(bundle_dir: str, prompt: str | None, prompt_ids: str | None, chat: bool, as_json: bool,
             backend: str, **kw: Any) -> None:
    """Generate text from an exported bundle."""
    from .runtime import api

    ids = api.parse_prompt_ids(prompt_ids) if prompt_ids is not None else None
    if prompt is None and ids is None:
        raise InputError("give --prompt TEXT or --prompt-ids 1,2,3")
    stream = None if as_json else (lambda delta: (sys.stdout.write(delta), sys.stdout.flush()))
    result = api.generate(bundle_dir, prompt=prompt, prompt_ids=ids, chat=chat, params=sampling_params(kw),
                          backend=backend, on_text=stream)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
    else:
        click.echo()
        t = result["timings"]
        progress(f"[{len(result['token_ids'])} tokens, prefill {t['prefill_s'] * 1000:.0f} ms, "
                 f"{t['decode_tokens_per_s']:.1f} tok/s, finish: {result['finish_reason']}]")


@main.command()
@click.argument("model_dir", type=click.Path(path_type=str))
@click.argument("bundle_dir", type=click.Path(path_type=str))
@click.option("--steps", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Teacher-forced decode steps and greedy tokens compared.")
@click.option("--json", "as_json", is_flag=True)
@backend_option
def validate(model_dir: str, bundle_dir: str, steps: int, as_json: bool, backend: str) -> None:
    """Compare a bundle with transformers (prefill, decode steps, greedy); non-zero exit on failure."""
    from .validation.validate import require_pass, validate as run

    report = run(model_dir, bundle_dir, steps=steps, backend=backend, progress=progress)
    click.echo(json.dumps(report.to_dict(), ensure_ascii=False) if as_json else report.table())
    require_pass(report)


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
