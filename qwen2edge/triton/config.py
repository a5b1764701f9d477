"""config.pbtxt for a qwen2edge model in Triton: rendered from typed settings, read back by model.py.

The settings travel as the config's `parameters` (string values): the Python backend hands the whole
config to `initialize`, so model.py needs nothing else to find its bundle and its qwen2edge.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from ..errors import InputError
from .protocol import INPUTS, OUTPUTS, config_tensors

BACKENDS = {"ort": "KIND_CPU", "trt": "KIND_GPU"}  # qwen2edge backend -> Triton instance kind
# Read by model.py before qwen2edge can be imported, so it is spelled there too (a literal).
PYTHON_PATH_KEY = "python_path"


@dataclass(frozen=True)
class ModelSettings:
    """What one model instance loads and how it batches (the config's parameters)."""

    bundle: str  # absolute, or relative to the model's version directory (beside model.py)
    backend: str = "ort"
    max_batch: int = 8  # rows of one instance's in-flight batch = requests it takes at once
    threads: int = 0  # ONNX Runtime intra-op threads per instance; 0 = every core the process may use
    streaming: bool = True  # decoupled transaction policy: streaming, but no plain /infer (HTTP or gRPC)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(f"unknown backend {self.backend!r}: set {{opt:backend}} to {' or '.join(BACKENDS)}")
        if self.max_batch < 1:
            raise InputError(f"{{opt:max_batch}} must be at least 1, got {self.max_batch}: e.g. 8")
        if self.threads < 0:
            raise InputError(f"{{opt:threads}} must be >= 0, got {self.threads}: 0 means every core")

    def to_parameters(self) -> dict[str, str]:
        return {f"qwen2edge_{k}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> "ModelSettings":
        """From the config's parameters ({key: string}); unknown keys are ignored."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = params.get(f"qwen2edge_{f.name}")
            if raw is not None:
                try:
                    values[f.name] = _parse(raw, f.type)
                except ValueError:
                    raise InputError(f"config.pbtxt parameter qwen2edge_{f.name} is {raw!r}, not a valid {f.type}: "
                                     "rewrite the repository with `qwen2edge triton-repo`") from None
        if "bundle" not in values:
            raise InputError("config.pbtxt has no qwen2edge_bundle parameter: rewrite the repository with "
                             "`qwen2edge triton-repo`")
        return cls(**values)


def render_config(name: str, settings: ModelSettings, instances: int, python_path: str) -> str:
    """config.pbtxt text: Python backend, decoupled (streaming), `instances` instances of the backend's kind."""
    params = {**settings.to_parameters(), PYTHON_PATH_KEY: python_path}
    param_lines = "\n".join(f"parameters: {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}"
                            for k, v in params.items())
    return "\n".join([
        "# Written by `qwen2edge triton-repo`: the model is qwen2edge's generator in Triton's Python backend.",
        f"name: {_quote(name)}",
        'backend: "python"',
        "# Triton does not batch: each instance takes up to qwen2edge_max_batch requests and batches them",
        "# itself, in flight; beyond that, requests wait in Triton's queue for a free instance.",
        "max_batch_size: 0",
        f"model_transaction_policy {{ decoupled: {str(settings.streaming).lower()} }}",
        config_tensors("input", INPUTS),
        config_tensors("output", OUTPUTS),
        f"instance_group [ {{ count: {instances} kind: {BACKENDS[settings.backend]} }} ]",
        param_lines,
        "",
    ])


def _parse(raw: str, kind: str) -> Any:
    if kind == "bool":
        if raw not in ("true", "false"):
            raise ValueError(raw)
        return raw == "true"
    return int(raw) if kind == "int" else raw


def _quote(text: str) -> str:
    """A protobuf text-format string literal (its escapes for quote and backslash match JSON's)."""
    return json.dumps(text, ensure_ascii=False)
