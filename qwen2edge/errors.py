"""One small exception hierarchy; the CLI maps each class to a one-line message and an exit code."""

from __future__ import annotations


class Qwen2EdgeError(Exception):
    """Base class. The message must name the problem and the fix, on one line."""

    exit_code = 1


class InputError(Qwen2EdgeError):
    """Bad user input: paths, config, weights, CLI values, prompts."""

    exit_code = 2


class ExportError(Qwen2EdgeError):
    """Tracing, checking or writing an ONNX bundle failed."""

    exit_code = 3


class BuildError(Qwen2EdgeError):
    """Building a TensorRT engine failed."""

    exit_code = 4


class ValidationError(Qwen2EdgeError):
    """A comparison against the reference is outside tolerance."""

    exit_code = 5


class InferenceError(Qwen2EdgeError):
    """Loading or running a bundle or engine failed at run time."""

    exit_code = 6


class BundleError(InputError):
    """An artifact directory is missing its manifest or fails its checksums."""
