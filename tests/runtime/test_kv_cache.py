"""The growable host cache: capacity policy, growth that keeps what was written, and generation through
growth that still equals transformers (buckets shrunk to 8 slots so the tiny models grow several times)."""

import json
import shutil

import numpy as np
import pytest

from qwen2edge import io_spec
from qwen2edge.errors import InternalError
from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.generator import Generator
from qwen2edge.runtime.kv_cache import HostKVCache, cache_capacity
from qwen2edge.runtime.ort_backend import ORT_CACHE
from qwen2edge.runtime.sampling import SamplingParams

PROMPTS = [[151644, 872, 198, 9707, 0, 11, 1879, 30], [40, 1079, 264, 1273, 13], [3838]]
GREEDY_60 = SamplingParams(max_new_tokens=60, stop_token_ids=(-1,))


@pytest.mark.parametrize("needed, current, max_len, want", [
    (1, 0, 4096, 256), (256, 0, 4096, 256), (257, 0, 4096, 512), (257, 256, 4096, 512),
    (100, 256, 4096, 256),  # fits: unchanged
    (1100, 256, 4096, 2048),  # jumps straight to the bucket that fits
    (3000, 2048, 3000, 3000),  # capped at max_seq_len
    (10, 0, 96, 96),  # a short bundle is one bucket
])
def test_capacity_policy(needed, current, max_len, want):
    assert cache_capacity(needed, current, max_len) == want


def test_capacity_beyond_max_seq_len_is_refused():
    with pytest.raises(InternalError, match="max_seq_len"):
        cache_capacity(97, 64, 96)


def _spec(max_len: int, growable: bool = True) -> io_spec.IOSpec:
    spec = io_spec.build_io_spec(2, 2, 4, 10, max_len, "fp32")
    if growable:
        return spec
    fixed = tuple(io_spec.TensorSpec(t.name, t.dtype, (t.shape[0], t.shape[1], max_len, t.shape[3]))
                  if t.name.startswith("past_") else t for t in spec.inputs)
    return io_spec.IOSpec(fixed, spec.outputs, spec.num_layers, max_len, spec.kv_dtype, spec.dca)


def test_bucket_size_is_a_parameter():
    assert cache_capacity(9, 0, 4096, bucket=8) == 16 and cache_capacity(9, 0, 4096, bucket=64) == 64


def test_growth_keeps_written_slots_and_marks_the_arrays_replaced():
    cache = HostKVCache(_spec(1000), 2, capacity=256)
    assert cache.capacity == 256 and cache.arrays["past_key.0"].shape == (2, 2, 256, 4)
    rng = np.random.default_rng(0)
    presents = {n.replace("past_", "present_"): rng.standard_normal((2, 2, 3, 4)).astype(np.float32)
                for n in cache.arrays}
    cache.write(presents, np.array([250, 10]))
    before = {n: a.copy() for n, a in cache.arrays.items()}
    assert cache.reserve(256) == 256 and cache.version == 0  # fits: nothing moves
    assert cache.reserve(300) == 512 and cache.version == 1
    for name, arr in cache.arrays.items():
        assert arr.shape == (2, 2, 512, 4)
        np.testing.assert_array_equal(arr[:, :, :256], before[name])
        assert not arr[:, :, 256:].any()
    assert cache.reserve(1000) == 1000  # the last bucket is max_seq_len itself


def test_rows_grow_by_doubling_up_to_the_limit_and_keep_their_contents():
    cache = HostKVCache(_spec(64), 1, capacity=16)
    cache.arrays["past_value.1"][0] = 7.0
    assert cache.reserve_rows(1, 16) == 1 and cache.version == 0
    assert cache.reserve_rows(2, 16) == 2 and cache.reserve_rows(3, 16) == 4 and cache.reserve_rows(9, 16) == 9
    assert cache.reserve_rows(12, 10) == 10  # never past the batch's slots
    assert cache.arrays["past_value.1"].shape == (10, 2, 16, 4) and cache.version == 4
    assert (cache.arrays["past_value.1"][0] == 7.0).all() and not cache.arrays["past_value.1"][1:].any()


def test_a_schema_1_spec_keeps_a_full_size_cache():
    cache = HostKVCache(_spec(64, growable=False), 1, capacity=8)
    assert not cache.growable and cache.capacity == 64 and cache.reserve(64) == 64 and cache.version == 0


def test_views_share_rows_and_reset_zeroes_them():
    cache = HostKVCache(_spec(64), 4, capacity=16)
    view = cache.view(1, 3)
    view.arrays["past_key.0"][:] = 5.0
    assert view.batch == 2 and (cache.arrays["past_key.0"][1:3] == 5.0).all() and not cache.arrays["past_key.0"][0].any()
    cache.move_row(2, 0)
    assert (cache.arrays["past_key.0"][0] == 5.0).all()
    view.reset()
    assert not cache.arrays["past_key.0"][1:3].any() and (cache.arrays["past_key.0"][0] == 5.0).all()


def _recording(gen: Generator) -> list[int]:
    """Cache capacities (slots) the generator's steps run over, step by step."""
    caps: list[int] = []
    step = gen.backend.step

    def spy(cache, feed, write_pos):
        caps.append(feed[io_spec.ATTENTION_MASK].shape[1] - feed[io_spec.INPUT_IDS].shape[1])
        assert caps[-1] == cache.capacity
        return step(cache, feed, write_pos)

    gen.backend.step = spy
    return caps


@pytest.mark.parametrize("variant", ["gqa", "yarn", "mqa_tied"])
def test_greedy_through_cache_growth_matches_transformers(variant, tiny_bundle_factory, hf_reference_factory):
    model_dir, bundle_dir = tiny_bundle_factory(variant)
    ref = hf_reference_factory(model_dir)
    gen = Bundle.open(bundle_dir).generator(cache_bucket=8)
    caps = _recording(gen)
    results, _ = gen.generate([PROMPTS[0]], GREEDY_60)
    assert results[0].token_ids == ref.greedy(PROMPTS[0], 60)
    assert caps[0] == 16 and sorted(set(caps)) == [16, 32, 64, 96], sorted(set(caps))  # grew 3 times


def test_padded_batch_through_growth_equals_single_requests(tiny_bundle_factory):
    _, bundle_dir = tiny_bundle_factory("gqa")
    gen = Bundle.open(bundle_dir).generator(cache_bucket=8)
    batch, _ = gen.generate(PROMPTS, GREEDY_60)
    for prompt, row in zip(PROMPTS, batch):
        single, _ = gen.generate([prompt], GREEDY_60)
        assert row.token_ids == single[0].token_ids and len(row.token_ids) == 60


def test_dca_through_growth_equals_a_full_size_cache(tiny_bundle_factory):
    """DCA's chunk ids are sliced to the cache's capacity each step; 60 tokens cross several chunks."""
    _, bundle_dir = tiny_bundle_factory("dca")
    outs = {}
    for bucket in (8, 1 << 20):  # growing from 8 slots / max_seq_len from the start
        gen = Bundle.open(bundle_dir).generator(cache_bucket=bucket)
        caps = _recording(gen)
        outs[bucket] = gen.generate([PROMPTS[0]], GREEDY_60)[0][0].token_ids
        assert len(set(caps)) == (1 if bucket > 96 else 4)
    assert outs[8] == outs[1 << 20] and len(outs[8]) == 60


def test_a_schema_1_bundle_still_runs(tiny_bundle_factory, tmp_path):
    """Bundles written before the cache length became a graph dimension: full-size cache, same tokens."""
    _, bundle_dir = tiny_bundle_factory("gqa")
    old = tmp_path / "old"
    shutil.copytree(bundle_dir, old, ignore=shutil.ignore_patterns(ORT_CACHE))
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["schema_version"] = 1
    for t in manifest["io_spec"]["inputs"]:
        if t["name"].startswith("past_"):
            t["shape"][2] = manifest["max_seq_len"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    bundle = Bundle.open(old)
    gen = bundle.generator()
    assert not bundle.spec.growable_cache
    caps = _recording(gen)
    got = gen.generate([PROMPTS[1]], GREEDY_60)[0][0].token_ids
    assert set(caps) == {bundle.max_seq_len}
    assert got == Bundle.open(bundle_dir).generator().generate([PROMPTS[1]], GREEDY_60)[0][0].token_ids


def test_prefix_copy_and_snapshot_keep_exactly_the_given_slots():
    cache = HostKVCache(_spec(64), 2, capacity=16)
    rng = np.random.default_rng(3)
    for arr in cache.arrays.values():
        arr[...] = rng.standard_normal(arr.shape)
    snap = cache.snapshot(1, 10)
    assert snap.batch == 1 and snap.capacity == 10 and snap.nbytes == sum(a[1:2, :, :10].nbytes for a in cache.arrays.values())
    other = HostKVCache(_spec(64), 3, capacity=32)
    other.copy_rows_from(snap, 0, 2, 7)
    for name, arr in other.arrays.items():
        np.testing.assert_array_equal(arr[2, :, :7], cache.arrays[name][1, :, :7])
        assert not arr[2, :, 7:].any() and not arr[:2].any()
    with pytest.raises(InternalError, match="copying 11 slots"):
        other.copy_rows_from(snap, 0, 0, 11)
