"""Open an exported bundle (manifest verified) and build what runs it: a backend, or a ready generator."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import io_spec
from ..bundle_manifest import BundleManifest
from ..config import ModelConfig
from ..errors import InputError
from .backend import Backend
from .generator import Generator
from .kv_cache import CACHE_BUCKET
from .tokenizer import BundleTokenizer, read_generation_config

BACKENDS = ("ort", "trt")


@dataclass(frozen=True)
class Bundle:
    """An exported artifact directory, checked against its manifest."""

    path: Path
    manifest: BundleManifest
    tokenizer: BundleTokenizer

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "Bundle":
        """Read and (by default) checksum the bundle at `path`; one-line errors for anything missing."""
        path = Path(path)
        if not path.exists():
            raise InputError(f"bundle directory {path} does not exist: run `qwen2edge export MODEL_DIR -o {path}` first")
        manifest = BundleManifest.read(path, verify=verify)
        return cls(path, manifest, BundleTokenizer.from_dir(path))

    @property
    def config(self) -> ModelConfig:
        return self.manifest.model_config

    @property
    def spec(self) -> io_spec.IOSpec:
        return self.manifest.io_spec

    @property
    def max_seq_len(self) -> int:
        return self.spec.max_seq_len

    @property
    def generation_config(self) -> dict[str, Any]:
        return read_generation_config(self.path / "generation_config.json")

    def stop_token_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids from generation_config.json, config.json and the tokenizer."""
        ids = list(self.config.eos_token_id)
        eos = self.generation_config.get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
        ids += list(self.tokenizer.eos_token_ids)
        return tuple(dict.fromkeys(int(i) for i in ids))

    def backend(self, kind: str = "ort", **options: Any) -> Backend:
        """A backend for this bundle (imports its library lazily); `options` go to its constructor."""
        if kind == "ort":
            from .ort_backend import OrtBackend

            return OrtBackend.from_bundle(self, **options)
        if kind == "trt":
            from .trt_backend import TrtBackend  # needs TensorRT and a GPU

            return TrtBackend.from_bundle(self, **options)
        raise InputError(f"unknown backend {kind!r}: set {{opt:backend}} to {' or '.join(BACKENDS)}")

    def generator(self, backend: str | Backend = "ort", *, cache_bucket: int = CACHE_BUCKET,
                  **backend_options: Any) -> Generator:
        """A ready generator: the backend (a kind, built with `backend_options`, or an instance made for this
        bundle), the tokenizer, the stop ids and, for Dual Chunk Attention, the host-side position feed."""
        runner = self.backend(backend, **backend_options) if isinstance(backend, str) else backend
        extra = None
        if self.spec.dca:
            from .dca_feed import DcaFeed

            extra = DcaFeed(self.config, self.max_seq_len)
        return Generator(runner, self.tokenizer, self.stop_token_ids(), extra_feed=extra, cache_bucket=cache_bucket)
