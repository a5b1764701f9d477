"""Open an exported bundle: manifest (checksums verified), config, I/O spec, tokenizer, backend."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import io_spec
from ..config import ModelConfig
from ..errors import BundleError, InputError
from ..manifest import model_digest, read_manifest
from .backend import Backend
from .tokenizer import BundleTokenizer

BACKENDS = ("ort", "trt")
ORT_CACHE = ".ort-cache"  # optimized ONNX Runtime graphs, beside the bundle's files (not in the manifest)


@dataclass
class Bundle:
    """An exported artifact directory, checked against its manifest."""

    path: Path
    manifest: dict[str, Any]
    config: ModelConfig
    spec: io_spec.IOSpec
    tokenizer: BundleTokenizer

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "Bundle":
        path = Path(path)
        if not path.exists():
            raise InputError(f"bundle directory {path} does not exist: run `qwen2edge export MODEL_DIR -o {path}` first")
        manifest = read_manifest(path, verify=verify)
        if manifest.get("schema_version") not in io_spec.READABLE_SCHEMAS:
            raise BundleError(f"{path} was written with manifest schema {manifest.get('schema_version')}, this "
                              f"qwen2edge reads {', '.join(map(str, io_spec.READABLE_SCHEMAS))}: re-export the bundle")
        try:
            config = ModelConfig.from_dict(manifest["model_config"])
            spec = io_spec.IOSpec.from_dict(manifest["io_spec"])
        except (KeyError, TypeError) as exc:
            raise BundleError(f"{path}/manifest.json lacks {exc}: re-export the bundle") from None
        return cls(path, manifest, config, spec, BundleTokenizer.from_dir(path))

    @property
    def max_seq_len(self) -> int:
        return self.spec.max_seq_len

    @property
    def generation_config(self) -> dict[str, Any]:
        p = self.path / "generation_config.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def stop_token_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids from generation_config.json, config.json and the tokenizer."""
        ids = list(self.config.eos_token_id)
        eos = self.generation_config.get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
        ids += list(self.tokenizer.eos_token_ids)
        return tuple(dict.fromkeys(int(i) for i in ids))

    def backend(self, kind: str = "ort", **kwargs: Any) -> Backend:
        """Instantiate a backend for this bundle (imports its library lazily)."""
        if kind == "ort":
            from .ort_backend import OrtBackend, optimized_cache_dir

            sha = model_digest(self.manifest)  # graph and weights: external data changes it too
            if sha and not kwargs.get("providers") and "optimized_model_path" not in kwargs:
                # CPU only: an optimized graph is specific to the providers that optimized it.
                kwargs.setdefault("optimized_cache", optimized_cache_dir(self.path / ORT_CACHE, sha))
            return OrtBackend(self.path / self.manifest["model_file"], self.spec, **kwargs)
        if kind == "trt":
            from .trt_backend import TrtBackend  # needs TensorRT and a GPU

            return TrtBackend.from_bundle(self, **kwargs)
        raise InputError(f"unknown backend {kind!r}: pass --backend {' or '.join(BACKENDS)}")
