"""Every kind of bundle the exporter makes (kinds.py), each exported once per session, from a tiny model
and from a copy of it with one MLP weight scaled by 1.05 (a check that cannot fail is no check)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..conftest import TINY_MAX_SEQ_LEN
from .kinds import KINDS, LAYOUT_KINDS, export_kind, scale_one_weight


@pytest.fixture(scope="session")
def kind_bundle(tiny_model_factory, tiny_bundle_factory, tmp_path_factory):
    """get(kind, broken=False) -> (the good model directory, the bundle directory).

    broken=True exports the same kind from the model with one MLP weight scaled: validated against the
    good model, it must fail. Plain, fp16 and the "from config" kinds reuse the suite's shared bundles."""
    root = tmp_path_factory.mktemp("kinds")
    cache: dict = {}

    def get(kind: str, broken: bool = False) -> tuple[Path, Path]:
        if (kind, broken) not in cache:
            name, opts = {**KINDS, **LAYOUT_KINDS}[kind]
            model = tiny_model_factory(name)
            if set(opts) <= {"dtype"} and not broken:
                cache[kind, broken] = tiny_bundle_factory(name, dtype=opts.get("dtype", "fp32"))
                return cache[kind, broken]
            src = model
            if broken:
                src = root / f"{name}-broken"
                if not src.exists():
                    scale_one_weight(model, src)
            out = export_kind(src, kind, root / f"{kind}{'-broken' if broken else ''}", TINY_MAX_SEQ_LEN)
            cache[kind, broken] = (model, out)
        return cache[kind, broken]

    return get
