"""The external-data layout that real checkpoints over 2 GiB get, exercised on a tiny model by lowering
the size limit: weights in model.onnx.data, checksummed in the manifest, and the bundle still runs and
equals the inline export."""

import json

import numpy as np
import onnx
import pytest

from qwen2edge.errors import BundleError
from qwen2edge.exporter import export as export_mod
from qwen2edge.exporter.export import DATA_FILE, MODEL_FILE, ExportOptions, export_bundle
from qwen2edge.bundle_manifest import BundleManifest
from qwen2edge.manifest import read_manifest
from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.ort_backend import ORT_CACHE
from qwen2edge.runtime.generator import prefill_feed
from qwen2edge.runtime.sampling import SamplingParams

from ..conftest import TINY_MAX_SEQ_LEN

PROMPT = [9707, 11, 1879, 0, 151644, 77091, 198]


@pytest.fixture(scope="module")
def external_bundle(tiny_model_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("external") / "bundle"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export_mod, "PROTOBUF_LIMIT", 1 << 20)  # every tiny model is "too big" now
        export_bundle(tiny_model_factory("gqa"), out, ExportOptions(max_seq_len=TINY_MAX_SEQ_LEN))
    return out


def _prefill_logits(bundle_dir):
    bundle = Bundle.open(bundle_dir)
    gen = bundle.generator()
    cache = gen.backend.new_cache(1)
    return gen.backend.step(cache, prefill_feed([PROMPT], bundle.max_seq_len, gen.pad_id), np.zeros(1, np.int64))


def test_weights_live_in_a_checksummed_side_file(external_bundle):
    manifest = json.loads((external_bundle / "manifest.json").read_text())
    assert DATA_FILE in manifest["files"] and manifest["files"][DATA_FILE]["bytes"] > 10 * (1 << 20)
    assert (external_bundle / MODEL_FILE).stat().st_size < (1 << 20)  # only the graph and offsets
    proto = onnx.load(str(external_bundle / MODEL_FILE), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {DATA_FILE}  # relative to model.onnx: the bundle can be moved
    assert not [p.name for p in external_bundle.iterdir() if p.name.startswith(".onnx-work")]


def test_external_bundle_equals_the_inline_one(external_bundle, tiny_bundle_factory):
    _, inline = tiny_bundle_factory("gqa")
    np.testing.assert_allclose(_prefill_logits(external_bundle), _prefill_logits(inline), rtol=0, atol=1e-5)
    greedy = SamplingParams(max_new_tokens=12)
    outs = [Bundle.open(b).generator().generate([PROMPT], greedy)[0][0].token_ids for b in (external_bundle, inline)]
    assert outs[0] == outs[1] and len(outs[0]) >= 1


def test_optimized_graph_cache_keys_on_the_weights_too(external_bundle):
    manifest = BundleManifest.read(external_bundle)
    model_sha = manifest.files[MODEL_FILE].sha256
    digest = manifest.model_digest
    assert digest != model_sha  # model.onnx alone does not name the weights
    first = _prefill_logits(external_bundle)  # writes the optimized-graph cache on first load
    cached = [p.name for p in (external_bundle / ORT_CACHE).iterdir() if not p.name.startswith(".")]
    assert len(cached) == 1 and cached[0].startswith(digest[:16]), cached
    np.testing.assert_array_equal(_prefill_logits(external_bundle), first)  # second load: from the cache


def test_a_damaged_side_file_is_refused(external_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(external_bundle, copy, ignore=shutil.ignore_patterns(ORT_CACHE))
    with open(copy / DATA_FILE, "r+b") as f:
        f.seek(4096)
        flipped = bytes(b ^ 0xFF for b in f.read(16))
        f.seek(4096)
        f.write(flipped)
    with pytest.raises(BundleError, match=DATA_FILE):
        read_manifest(copy)
