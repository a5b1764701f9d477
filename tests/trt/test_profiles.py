"""Optimization profiles computed from the I/O spec: every dynamic input, both profiles, selection."""

import pytest

from qwen2edge import io_spec
from qwen2edge.errors import InferenceError, InputError
from qwen2edge.runtime.generator import decode_feed, prefill_feed
from qwen2edge.trt.profiles import (DECODE, PREFILL, Profile, compute_profiles, resolve_limits, select_profile)

import numpy as np

L = 96


def spec(dca=False, layers=2):
    return io_spec.build_io_spec(layers, 2, 16, 1000, L, "fp16", dca=dca)


def test_every_input_gets_min_opt_max_in_both_profiles():
    s = spec(dca=True)
    prefill, decode = compute_profiles(s, resolve_limits(s, max_batch=4, max_input_len=64, max_logits=8))
    assert (prefill.name, decode.name) == (PREFILL, DECODE)
    for p in (prefill, decode):
        assert set(p.shapes) == set(s.input_names)
    # prefill: batch 1..4 (opt 1), seq 1..64 (opt 64: below the 128 default opt), n_logits 1..8
    assert prefill.shapes["input_ids"] == ((1, 1), (1, 64), (4, 64))
    assert prefill.shapes["attention_mask"] == ((1, L + 1), (1, L + 64), (4, L + 64))
    assert prefill.shapes["logits_index"] == ((1, 1), (1, 1), (4, 8))
    assert prefill.shapes[io_spec.DCA_K_CHUNK] == ((1, L + 1), (1, L + 64), (4, L + 64))
    assert prefill.shapes[io_spec.DCA_SCALE] == ((1,), (1,), (4,))
    assert prefill.shapes["past_key.1"] == ((1, 2, L, 16), (1, 2, L, 16), (4, 2, L, 16))
    # decode: one token, one logit row, opt at the full batch
    assert decode.shapes["input_ids"] == ((1, 1), (4, 1), (4, 1))
    assert decode.shapes["attention_mask"] == ((1, L + 1), (4, L + 1), (4, L + 1))
    assert decode.shapes["logits_index"] == ((1, 1), (4, 1), (4, 1))


def test_prefill_opt_seq_is_capped():
    s = spec()
    prefill, _ = compute_profiles(s, resolve_limits(s, max_input_len=L))
    assert prefill.shapes["input_ids"][1] == (1, 96)
    big = io_spec.build_io_spec(1, 1, 8, 10, 4096)
    prefill, _ = compute_profiles(big, resolve_limits(big))
    assert prefill.shapes["input_ids"] == ((1, 1), (1, 128), (1, 1024))  # defaults: 1024 input, opt 128


@pytest.mark.parametrize("kw, needle", [
    ({"max_batch": 0}, "--max-batch"), ({"max_input_len": L + 1}, "--max-input-len"),
    ({"max_input_len": 16, "max_logits": 17}, "--max-logits"),
])
def test_limits_refused(kw, needle):
    with pytest.raises(InputError, match=needle):
        resolve_limits(spec(), **kw)


def test_generator_feeds_select_the_right_profile():
    s = spec()
    profiles = compute_profiles(s, resolve_limits(s, max_batch=2, max_input_len=32, max_logits=32))
    cache = {t.name: (2, 2, L, 16) for t in s.inputs if t.name.startswith("past_")}

    def shapes(feed):
        return {k: v.shape for k, v in feed.items()} | cache

    pre = prefill_feed([[1, 2, 3], [4, 5]], L, 0)
    assert profiles[select_profile(profiles, shapes(pre))].name == PREFILL
    dec = decode_feed(np.array([7, 8]), np.array([3, 2]), L)
    assert profiles[select_profile(profiles, shapes(dec))].name == DECODE
    # a one-token prompt is a decode-shaped step: the decode profile takes it
    one = prefill_feed([[1], [2]], L, 0)
    assert profiles[select_profile(profiles, shapes(one))].name == DECODE
    # validation-style prefill with logits at every position
    val = dict(pre, logits_index=np.arange(3)[None].repeat(2, 0))
    assert profiles[select_profile(profiles, shapes(val))].name == PREFILL


def test_out_of_profile_shapes_name_the_fix():
    s = spec()
    profiles = compute_profiles(s, resolve_limits(s, max_batch=1, max_input_len=8, max_logits=2))
    cache = {t.name: (1, 2, L, 16) for t in s.inputs if t.name.startswith("past_")}
    feed = prefill_feed([list(range(9))], L, 0)
    with pytest.raises(InferenceError, match="rebuild the engine with larger --max-batch / --max-input-len"):
        select_profile(profiles, {k: v.shape for k, v in feed.items()} | cache)
    wide = {k: v.shape for k, v in prefill_feed([[1, 2, 3]] * 2, L, 0).items()} | cache
    with pytest.raises(InferenceError):
        select_profile(profiles, wide)  # batch 2 > max_batch 1


def test_profile_round_trips_through_json():
    import json

    s = spec(dca=True)
    for p in compute_profiles(s, resolve_limits(s, max_batch=3)):
        assert Profile.from_dict(json.loads(json.dumps(p.to_dict()))) == p
