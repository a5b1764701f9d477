"""Typed results of one comparison, with a verdict (in the spirit of Polygraphy's comparator results):
each check knows its measured value, its bound, which way it fails and whether it passed; a backend
passes when all its checks do, the comparison when every backend and the per-layer check do."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pathlib import Path

from .. import __version__
from ..errors import ValidationError
from .thresholds import CRITERIA

SCHEMA = "qwen2edge.compare"
SCHEMA_VERSION = 2  # 2: typed checks, reference object, preset, bundle kind, storage cost, ort-graph


@dataclass(frozen=True)
class Check:
    """One criterion applied to one measured value."""

    key: str
    measured: float | None  # None: not measured in this run (e.g. no perplexity text); never fails
    bound: float
    passes_when: str  # "<=" or ">="
    passed: bool
    description: str

    @classmethod
    def of(cls, key: str, measured: float | None, bound: float) -> "Check":
        c = CRITERIA[key]
        return cls(key, measured, bound, c.passes_when, measured is None or c.passes(measured, bound), c.description)

    def line(self) -> str:
        return f"{self.key} {self.measured:.4g}, must be {self.passes_when} {self.bound:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "measured": self.measured, "bound": self.bound, "passes_when": self.passes_when,
                "passed": self.passed, "description": self.description}


@dataclass
class BackendResult:
    """One runner against the reference."""

    backend: str
    description: str
    tolerance_row: str
    thresholds: dict[str, float]
    prompts: list[dict[str, Any]]
    perplexity: list[dict[str, Any]]
    histogram: dict[str, Any]
    summary: dict[str, Any]
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[str]:
        return [c.line() for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "description": self.description, "tolerance_row": self.tolerance_row,
                "thresholds": self.thresholds, "passed": self.passed, "failures": self.failures,
                "checks": [c.to_dict() for c in self.checks], "summary": self.summary, "prompts": self.prompts,
                "perplexity": self.perplexity, "histogram": self.histogram}


@dataclass
class LayerResult:
    """Per-layer hidden-state drift (layers.py) and its check."""

    source: str
    backend: str
    tolerance_row: str
    rows: list[dict[str, Any]]
    first_over: int | None
    first_over_name: str | None
    largest_jump: int
    largest_jump_name: str
    check: Check

    @property
    def failures(self) -> list[str]:
        if self.check.passed:
            return []
        return [self.check.line(), f"error enters at {self.first_over_name} (first hidden state over "
                                   f"{self.check.bound:g})"]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "backend": self.backend, "tolerance_row": self.tolerance_row,
                "threshold": self.check.bound, "rows": self.rows, "first_over": self.first_over,
                "first_over_name": self.first_over_name, "largest_jump": self.largest_jump,
                "largest_jump_name": self.largest_jump_name, "passed": self.check.passed,
                "check": self.check.to_dict(), "failures": self.failures}


@dataclass
class ComparisonResult:
    """Everything one `validate` or `compare` run found; `passed` is the verdict."""

    preset: str
    created: str
    reference: dict[str, str]  # name, kind, weights
    model_dir: str
    bundle_dir: str
    bundle: dict[str, Any]  # dtype, quantization, long_context, debug_hidden_states, external_data
    model: dict[str, int]
    steps: int
    prompts: list[dict[str, Any]]
    threshold_overrides: dict[str, float]
    backends: list[BackendResult]
    layers: LayerResult | None = None
    storage_cost: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(b.passed for b in self.backends) and (self.layers is None or self.layers.check.passed)

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    @property
    def failures(self) -> list[str]:
        out = [f"{b.backend}: {f}" for b in self.backends for f in b.failures]
        return out + [f"layers: {f}" for f in (self.layers.failures if self.layers else [])]

    def backend(self, name: str) -> BackendResult:
        return next(b for b in self.backends if b.backend == name)

    def to_dict(self) -> dict[str, Any]:
        """report.json (docs/compare.md)."""
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "qwen2edge_version": __version__,
            "preset": self.preset, "created": self.created, "reference": self.reference,
            "model_dir": self.model_dir, "bundle_dir": self.bundle_dir, "dtype": self.bundle["dtype"],
            "bundle": self.bundle, "model": self.model, "steps": self.steps, "prompts": self.prompts,
            "threshold_overrides": self.threshold_overrides,
            "backends": [b.to_dict() for b in self.backends],
            "layers": self.layers.to_dict() if self.layers else None,
            "storage_cost": self.storage_cost, "notes": self.notes,
            "passed": self.passed, "verdict": self.verdict, "failures": self.failures,
        }


def require_pass(result: ComparisonResult, report_dir: str | Path | None = None) -> None:
    """The one pass/fail exit: ValidationError (exit code 5) naming the first failures when the verdict is FAIL."""
    if result.passed:
        return
    failures = result.failures
    where = f"see {Path(report_dir) / 'report.html'}" if report_dir else "see the table above"
    raise ValidationError(f"{result.preset} failed ({'; '.join(failures[:2])}{'; ...' if len(failures) > 2 else ''}): "
                          f"{where}; fix the export, or relax a bound with {{opt:threshold}} KEY=VALUE")
