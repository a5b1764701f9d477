"""Dual Chunk Attention, exported: ONNX vs the independent float64 reference (qwen2edge/validation/naive.py).

Tiny model: chunk 16, local 4 -> period s = 12; temperature from L0 = 32. A 40-token prompt spans
four chunks (0-11, 12-23, 24-35, 36-39) and so uses the intra, successive and inter sets.
"""

import numpy as np
import onnx
import pytest

from qwen2edge import io_spec
from qwen2edge.errors import InternalError
from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.generator import Generator, decode_feed, prefill_feed
from qwen2edge.runtime.sampling import SamplingParams
from qwen2edge.validation.engine import teacher_forced
from qwen2edge.validation.naive import NaiveQwen2
from qwen2edge.validation.reference import load_reference

L = 96
TOL = 1e-4  # float32 graph vs float64 reference; a wrong set, position or temperature moves logits by > 1e-1
IDS = [int(x) for x in np.random.default_rng(7).integers(0, 151000, size=80)]


@pytest.fixture(scope="module")
def dca(tiny_bundle_factory):
    model_dir, bundle_dir = tiny_bundle_factory("dca", max_seq_len=L)
    bundle = Bundle.open(bundle_dir)
    naive = load_reference(model_dir, bundle)  # what validate and compare use for a DCA bundle
    assert isinstance(naive, NaiveQwen2)
    return model_dir, bundle, bundle.generator(), naive


def _prefill_all(gen, ids):
    """Logits at every position of one prefill (the generator's step adds the DCA inputs)."""
    feed = prefill_feed([ids], L, 0)
    feed[io_spec.LOGITS_INDEX] = np.arange(len(ids))[None]
    return gen.step(gen.backend.new_cache(1), feed, np.zeros(1, dtype=np.int64))[0]


def test_graph_is_static_and_standard(dca):
    _, bundle, *_ = dca
    model = onnx.load(str(bundle.path / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"If", "Loop", "Scan"}, ops  # no data-dependent control flow
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    names = [i.name for i in model.graph.input]
    assert set(io_spec.DCA_INPUTS) <= set(names) and io_spec.POSITION_IDS in names
    assert bundle.manifest.long_context.mode == "dca"


def test_prefill_spanning_four_chunks_matches_naive_reference(dca):
    _, _, gen, naive = dca
    ids = IDS[:40]  # sf(40) = 1 + 0.1 ln(40/32) > 1: the temperature is on
    got = _prefill_all(gen, ids)
    want = naive.logits(ids)
    err = np.abs(got - want).max()
    print(f"DCA ONNX vs naive, 40-token prefill (4 chunks): max |delta logit| {err:.3g}")
    assert err < TOL and np.abs(want).max() > 0.5


def test_decode_steps_crossing_chunk_boundaries_match_naive_reference(dca):
    """Prefill 20 tokens, decode 40 one by one (crossing boundaries 24, 36, 48): every key keeps the
    temperature of the step that wrote it, exactly as the reference replays it."""
    _, _, gen, naive = dca
    ids = IDS[:60]
    got = teacher_forced(gen, ids[:20], ids[20:])
    want = naive.logits(ids, prompt_len=20)
    err = np.abs(got - want).max()
    print(f"DCA ONNX prefill 20 + 40 decode steps vs naive (5 chunks): max |delta logit| {err:.3g}")
    assert err < TOL
    # The temperature really matters here: one long prefill's logits differ.
    assert np.abs(got[40:] - naive.logits(ids)[40:]).max() > 1e-2


def test_prefill_then_decode_equals_one_prefill(dca):
    """No temperature below L0 = 32: prefill 7 + 23 decode steps (crossing 12 and 24) == one 30-token prefill."""
    _, _, gen, _ = dca
    ids = IDS[:30]
    whole = _prefill_all(gen, ids)
    stepped = teacher_forced(gen, ids[:7], ids[7:])
    np.testing.assert_allclose(stepped, whole, atol=2e-5, rtol=0)


def test_unaligned_prefill_blocks(dca):
    """Prefill 13 tokens, then a 17-token block (crossing the boundary at 24), then a decode step."""
    _, _, gen, naive = dca
    ids = IDS[:31]
    cache = gen.backend.new_cache(1)
    gen.step(cache, prefill_feed([ids[:13]], L, 0), np.zeros(1, dtype=np.int64))
    t = 17
    mask = np.zeros((1, L + t), dtype=np.int64)
    mask[0, :13] = 1
    mask[0, L:] = 1
    block = {io_spec.INPUT_IDS: np.array([ids[13:30]]), io_spec.POSITION_IDS: np.arange(13, 30)[None],
             io_spec.ATTENTION_MASK: mask, io_spec.LOGITS_INDEX: np.arange(t)[None]}
    got_block = gen.step(cache, block, np.array([13]))[0]
    length = np.array([30])
    got_last = gen.step(cache, decode_feed(np.array([ids[30]]), length, L), length)[0]
    want = naive.logits(ids)  # all lengths <= 32: sf = 1 everywhere
    assert np.abs(got_block - want[13:30]).max() < TOL
    assert np.abs(got_last - want[30:31]).max() < TOL


def test_within_one_period_equals_plain_attention(dca, tmp_path_factory):
    """seq <= s: only the intra set occurs, so the DCA graph's logits equal the plain graph's."""
    from qwen2edge.config import load_hf_config
    from qwen2edge.exporter.export import ExportOptions, export_bundle

    model_dir, _, gen, naive = dca
    cfg, _ = load_hf_config(model_dir)
    plain_dir = tmp_path_factory.mktemp("dca-as-plain") / "b"
    export_bundle(model_dir, plain_dir, ExportOptions(max_seq_len=L), cfg_override=cfg.replace(dual_chunk=None))
    plain = Bundle.open(plain_dir).generator()
    ids = IDS[:12]
    got = teacher_forced(gen, ids[:5], ids[5:])
    want = teacher_forced(plain, ids[:5], ids[5:])
    diff = np.abs(got - want).max()
    print(f"DCA vs plain attention within one period: max |delta logit| {diff:.3g}")
    # Same math, not the same float32 op order: the stacked [G*3*T, D] query MatMul is blocked
    # differently from the plain graph's, so the graphs agree to rounding, not bit for bit.
    assert diff <= 1e-5
    # The reference agrees that DCA within a period is plain RoPE attention.
    np.testing.assert_array_equal(naive.logits(ids), _NaivePlain(naive).logits(ids))


class _NaivePlain:
    """The same naive reference with DCA switched off."""

    def __init__(self, naive: NaiveQwen2):
        import copy

        self.m = copy.copy(naive)
        self.m.chunk = None

    def logits(self, ids):
        return self.m.logits(ids)


def test_cache_within_one_period_is_noted_and_runs(tiny_model_factory, tmp_path):
    """max_seq_len <= period: DCA can never leave the first chunk; the export says so and still works."""
    from qwen2edge.exporter.export import ExportOptions, export_bundle

    said: list[str] = []
    out = tmp_path / "b"
    m = export_bundle(tiny_model_factory("dca"), out, ExportOptions(max_seq_len=10), progress=said.append)
    assert any("equals plain attention" in n for n in m.long_context.notes)
    assert any(s.startswith("note: max_seq_len 10 <= DCA period 12") for s in said)
    gen = Bundle.open(out).generator()
    res, _ = gen.generate([IDS[:4]], SamplingParams(max_new_tokens=6, stop_token_ids=(-1,)))
    assert len(res[0].token_ids) == 6


def test_naive_reference_plain_mode_matches_transformers(tiny_model_factory, hf_reference_factory):
    """The reference's non-DCA path is transformers' Qwen2, so its DCA path differs only by the spec's rules."""
    from qwen2edge.config import load_hf_config
    from qwen2edge.exporter.checkpoint import read_state_dict

    model_dir = tiny_model_factory("gqa")
    naive = NaiveQwen2(load_hf_config(model_dir)[0].to_dict(),
                       {k: v.double().numpy() for k, v in read_state_dict(model_dir).items()})
    ids = IDS[:30]
    ours, hidden = naive.forward(ids)
    theirs = hf_reference_factory(model_dir)
    assert np.abs(ours - theirs.logits(ids)).max() < 1e-4
    # Hidden states too (per-layer drift compares them), laid out like output_hidden_states.
    want = theirs.hidden_states(ids)
    assert len(hidden) == len(want) == 3
    assert max(np.abs(a - b).max() for a, b in zip(hidden, want)) < 1e-4


def test_generator_without_dca_inputs_is_refused(dca):
    """Only Bundle.generator() builds generators for users; one assembled without the DCA feed is a bug,
    caught at construction rather than as a missing-input error mid-generation."""
    _, bundle, gen, _ = dca
    with pytest.raises(InternalError, match="position inputs.*report this as a qwen2edge bug"):
        Generator(gen.backend, bundle.tokenizer)


def test_decode_reads_the_cache_without_copying_it(dca, tmp_path):
    """After ONNX Runtime's optimizations the cache feeds MatMuls directly (the K transpose is fused),
    so a DCA step never materialises a copy of the cache."""
    _, bundle, *_ = dca
    opt = tmp_path / "opt.onnx"
    bundle.backend("ort", optimized_model_path=opt)
    consumers = {n.op_type for n in onnx.load(str(opt)).graph.node for i in n.input if i.startswith("past_")}
    assert consumers <= {"Shape", "Unsqueeze", "MatMul", "FusedMatMul"}, consumers
