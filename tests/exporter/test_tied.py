"""Tied embeddings are stored once in the exported graph (and still match transformers: test_parity)."""

import onnx
import pytest


def _vocab_sized(bundle_dir, vocab: int) -> list[tuple[str, list[int]]]:
    model = onnx.load(str(bundle_dir / "model.onnx"), load_external_data=False)
    return [(t.name, list(t.dims)) for t in model.graph.initializer if vocab in t.dims]


@pytest.mark.parametrize("variant, expected", [("mqa_tied", 1), ("gqa", 2)])
def test_tied_matrix_stored_once(variant, expected, tiny_bundle_factory):
    _, bundle = tiny_bundle_factory(variant)
    found = _vocab_sized(bundle, 151646)
    assert len(found) == expected, found
