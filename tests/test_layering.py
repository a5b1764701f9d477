"""The package's layering, checked statically: the edge runtime and the server import nothing from the export
side, and no module grows past one job's worth of lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qwen2edge

PACKAGE = Path(qwen2edge.__file__).parent
EDGE = ("runtime", "serve", "triton")  # what a device without torch runs (triton: inside Triton's Python)
EXPORT_SIDE = ("qwen2edge.graphs", "qwen2edge.exporter", "qwen2edge.validation", "torch", "transformers")
MAX_LINES = 500


def _imports(path: Path) -> list[str]:
    """Absolute names of every module `path` imports (relative imports resolved), lazy ones included."""
    package = ".".join(("qwen2edge", *path.relative_to(PACKAGE).with_suffix("").parts[:-1]))
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base]) if base else ".".join(parent)
            out += [base] + [f"{base}.{a.name}" for a in node.names]
    return out


@pytest.mark.parametrize("sub", EDGE)
def test_edge_modules_import_nothing_from_the_export_side(sub):
    bad = [(p.relative_to(PACKAGE).as_posix(), name) for p in sorted((PACKAGE / sub).rglob("*.py"))
           for name in _imports(p) if name.startswith(EXPORT_SIDE)]
    assert not bad, bad


def test_the_import_check_sees_relative_imports():
    """A check that cannot fail is no check: graphs/model.py does import torch and positions/."""
    names = _imports(PACKAGE / "graphs" / "model.py")
    assert "torch" in names and "qwen2edge.positions.dca" in names


def test_no_module_is_over_500_lines():
    long = {p.relative_to(PACKAGE).as_posix(): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by job: {long}"
