"""The bundle's manifest.json as one typed, frozen object (torch-free).

Every reader of a bundle goes through `BundleManifest`: the schema check happens here once, and the
model config, the I/O spec, the long-context record, the quantization record and the checksums
come out typed, so no caller indexes a raw dict.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from . import io_spec
from .config import ModelConfig
from .errors import BundleError, InputError
from .manifest import MANIFEST, check_entry, file_table, is_confined, read_manifest, verify_files, write_json_atomic

BUNDLE_KIND = "onnx-bundle"
TOKENIZER_JSON = "tokenizer.json"
# Files the runtime reads when they are present (besides the model and its external data): each must then
# be listed, or an unlisted one could be swapped in unverified.
RUNTIME_READS = (TOKENIZER_JSON, "tokenizer_config.json", "generation_config.json")


@dataclass(frozen=True)
class FileEntry:
    """One file of the bundle: its sha256 and size."""

    sha256: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class LongContextRecord:
    """The long-context setup the graph was exported with (after config.json and the export flags)."""

    mode: str = "plain"  # "plain" | "yarn" | "dca"
    summary: str = "plain RoPE"
    overrides: Mapping[str, Any] = field(default_factory=dict)  # the export flags that changed config.json
    notes: tuple[str, ...] = ()
    rope_scaling: Mapping[str, Any] | None = None
    dual_chunk: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "summary": self.summary, "overrides": dict(self.overrides),
                "notes": list(self.notes), "rope_scaling": self.rope_scaling and dict(self.rope_scaling),
                "dual_chunk": self.dual_chunk and dict(self.dual_chunk)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "LongContextRecord":
        if not d:
            return cls()
        return cls(mode=str(d.get("mode", "plain")), summary=str(d.get("summary", "plain RoPE")),
                   overrides=dict(d.get("overrides") or {}), notes=tuple(d.get("notes") or ()),
                   rope_scaling=d.get("rope_scaling"), dual_chunk=d.get("dual_chunk"))


@dataclass(frozen=True)
class QuantizationRecord:
    """Weight-only quantization of a bundle; `details` keeps the exporter's other figures verbatim."""

    scheme: str  # "int8" | "int4"
    block_size: int
    embeddings: bool
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "block_size": self.block_size, "embeddings": self.embeddings,
                **self.details}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "QuantizationRecord | None":
        if not d:
            return None
        rest = {k: v for k, v in d.items() if k not in ("scheme", "block_size", "embeddings")}
        return cls(scheme=str(d["scheme"]), block_size=int(d["block_size"]), embeddings=bool(d["embeddings"]),
                   details=rest)


@dataclass(frozen=True)
class BundleManifest:
    """manifest.json of an ONNX bundle."""

    model_file: str
    dtype: str  # export dtype: "fp32" | "fp16" | "bf16"
    opset: int
    max_seq_len: int
    model_config: ModelConfig
    io_spec: io_spec.IOSpec
    long_context: LongContextRecord = LongContextRecord()
    quantization: QuantizationRecord | None = None
    debug_hidden_states: bool = False
    tokenizer_files: tuple[str, ...] = ()
    files: Mapping[str, FileEntry] = field(default_factory=dict)
    source: Mapping[str, Any] = field(default_factory=dict)
    library_versions: Mapping[str, str] = field(default_factory=dict)
    export_seconds: float = 0.0
    schema_version: int = io_spec.SCHEMA_VERSION
    kind: str = BUNDLE_KIND

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))

    @property
    def tolerance_key(self) -> str:
        """The accuracy tolerance that applies: the quantization scheme, else the export dtype."""
        return self.quantization.scheme if self.quantization else self.dtype

    @property
    def model_digest(self) -> str:
        """One sha256 naming the model's graph *and* its weights: the model file's own when the weights are
        inline, else a digest over the model file's and its external-data file's checksums (an external-data
        model.onnx only holds offsets, so two exports with different weights can share its checksum)."""
        own = self.files.get(self.model_file)
        data = self.files.get(self.model_file + ".data")
        if data is None:
            return own.sha256 if own else ""
        return hashlib.sha256(f"{own.sha256 if own else ''}\n{data.sha256}\n".encode()).hexdigest()

    @property
    def model_bytes(self) -> int:
        """Bytes of the model file and its external weights."""
        return sum(e.bytes for rel, e in self.files.items() if rel in (self.model_file, self.model_file + ".data"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kind": self.kind,
            "model_file": self.model_file,
            "dtype": self.dtype,
            "debug_hidden_states": self.debug_hidden_states,
            "opset": self.opset,
            "quantization": self.quantization.to_dict() if self.quantization else None,
            "max_seq_len": self.max_seq_len,
            "model_config": self.model_config.to_dict(),
            "long_context": self.long_context.to_dict(),
            "io_spec": self.io_spec.to_dict(),
            "tokenizer_files": list(self.tokenizer_files),
            "source": dict(self.source),
            "library_versions": dict(self.library_versions),
            "export_seconds": self.export_seconds,
            "files": {rel: e.to_dict() for rel, e in self.files.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "manifest.json") -> "BundleManifest":
        """Parse and schema-check a manifest dict; BundleError names what is wrong and says to re-export."""
        if not isinstance(d, Mapping):
            raise BundleError(f"{where} does not hold a JSON object: re-export the bundle")
        version = d.get("schema_version")
        if version not in io_spec.READABLE_SCHEMAS:
            raise BundleError(f"{where} was written with manifest schema {version}, this qwen2edge reads "
                              f"{', '.join(map(str, io_spec.READABLE_SCHEMAS))}: re-export the bundle")
        try:
            manifest = cls(
                model_file=str(d["model_file"]),
                dtype=str(d["dtype"]),
                opset=int(d["opset"]),
                max_seq_len=int(d["max_seq_len"]),
                model_config=ModelConfig.from_dict(d["model_config"]),
                io_spec=io_spec.IOSpec.from_dict(d["io_spec"]),
                long_context=LongContextRecord.from_dict(d.get("long_context")),
                quantization=QuantizationRecord.from_dict(d.get("quantization")),
                debug_hidden_states=bool(d.get("debug_hidden_states", False)),
                tokenizer_files=tuple(d.get("tokenizer_files") or ()),
                files={rel: FileEntry(*check_entry(rel, m, where)) for rel, m in _files_table(d, where).items()},
                source=dict(d.get("source") or {}),
                library_versions=dict(d.get("library_versions") or {}),
                export_seconds=float(d.get("export_seconds") or 0.0),
                schema_version=int(version),
                kind=str(d.get("kind", BUNDLE_KIND)),
            )
        except BundleError:
            raise
        except InputError as exc:  # a model_config value out of range
            raise BundleError(f"{where} holds a bad model config ({exc}): re-export the bundle") from None
        except KeyError as exc:
            raise BundleError(f"{where} lacks {exc}: re-export the bundle") from None
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{where} has a malformed entry ({exc}): re-export the bundle") from None
        manifest.check_listed(where)
        return manifest

    def check_listed(self, where: str = MANIFEST) -> None:
        """Every file the runtime loads must be listed (so verified) and inside the bundle: the model and
        the tokenizer files."""
        for name, role in ((self.model_file, "model_file"), (TOKENIZER_JSON, "tokenizer"),
                           *((f, "tokenizer_files") for f in self.tokenizer_files)):
            if not is_confined(name):
                raise BundleError(f"{where} names {name!r} as its {role}, a path outside the bundle: refusing it; "
                                  "re-export the bundle")
            if name not in self.files:
                raise BundleError(f"{where} does not list {name}, which the runtime loads, so it cannot be "
                                  "verified: re-export the bundle")

    @classmethod
    def read(cls, root: str | Path, verify: bool = True) -> "BundleManifest":
        """root/manifest.json, typed; with `verify`, every listed file's size and sha256 is checked, and a
        file the runtime would read but the manifest does not list is refused."""
        root, where = Path(root), str(Path(root) / MANIFEST)
        manifest = cls.from_dict(read_manifest(root, verify=False), where=where)
        if verify:
            verify_files(root, {rel: e.to_dict() for rel, e in manifest.files.items()}, where)
            for name in (*RUNTIME_READS, manifest.model_file + ".data"):
                if name not in manifest.files and (root / name).exists():
                    raise BundleError(f"{root / name} is not listed in {where}, so it cannot be verified: remove "
                                      "it, or re-export the bundle")
        return manifest

    def write(self, root: str | Path) -> "BundleManifest":
        """Checksum every file under root and write root/manifest.json; returns the manifest with its files."""
        root = Path(root)
        files = {rel: FileEntry(m["sha256"], m["bytes"]) for rel, m in file_table(root).items()}
        done = dataclasses.replace(self, files=files)
        write_json_atomic(root / MANIFEST, done.to_dict())
        return done



def _files_table(d: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    files = d.get("files")
    if not isinstance(files, Mapping) or not files:
        raise BundleError(f"{where} lists no files, so nothing in the bundle can be verified: re-export the bundle")
    return files
