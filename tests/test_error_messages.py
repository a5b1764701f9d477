"""Error messages name the fix in the terms of the interface used (flags, fields, files), never as a call
into qwen2edge's or another library's Python API: checked statically over every raise in the package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import qwen2edge

PACKAGE = Path(qwen2edge.__file__).parent
# A dotted call (`runtime.api.dca_feed_for(bundle)`), a keyword argument (`extra_feed=...`) or a dotted
# snake_case name (`tokenizer.save_pretrained`) in the text a user reads.
PYTHON_API = re.compile(r"\b[A-Za-z_]\w*\.[A-Za-z_]\w*\(|\b[a-z_]+=[a-z_]+\.|\b[a-z]\w*\.[a-z]+_[a-z_]+\b")


def _raised_texts(path: Path) -> list[tuple[int, str]]:
    """(line, literal text) of every string literal inside the arguments of a `raise` statement."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            # `param=` names the offending HTTP field (`response_format.json_schema`): a field path, not an API
            fields = {id(k.value) for k in ast.walk(node.exc) if isinstance(k, ast.keyword) and k.arg == "param"}
            for arg in ast.walk(node.exc):
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and id(arg) not in fields:
                    out.append((node.lineno, arg.value))
    return out


def test_no_error_message_names_a_python_api_as_the_fix():
    bad = [f"{p.relative_to(PACKAGE)}:{line}: {text}" for p in sorted(PACKAGE.rglob("*.py"))
           for line, text in _raised_texts(p) if PYTHON_API.search(text)]
    assert not bad, bad


def test_the_check_catches_the_old_messages():
    """A check that cannot fail is no check: the messages issue #11 found are caught."""
    for old in ('raise InputError("needs its host-side inputs: pass extra_feed=runtime.api.dca_feed_for(bundle)")',
                'raise InputError(f"{d} has no tokenizer.json: save it (tokenizer.save_pretrained) and export again")'):
        texts = [n.value for n in ast.walk(ast.parse(old)) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        assert any(PYTHON_API.search(t) for t in texts), old
