"""Host-side DCA position indices: the spec's section-3 worked example, reproduced exactly."""

import numpy as np
import pytest

from qwen2edge import io_spec
from qwen2edge.config import DualChunkConfig, ModelConfig
from qwen2edge.positions import dca
from qwen2edge.runtime.dca_feed import DcaFeed
from qwen2edge.runtime.generator import decode_feed, prefill_feed

DC = DualChunkConfig(chunk_size=8, local_size=2)  # s = 6
POS = np.arange(16)

# Spec section 3, copied as printed there.
P_K = [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
P_SUCC = [6, 7, 8, 8, 8, 8, 6, 7, 8, 8, 8, 8, 6, 7, 8, 8]
ROWS = {
    0: "I . . . . . . . . . . . . . . .",
    1: "I I . . . . . . . . . . . . . .",
    5: "I I I I I I . . . . . . . . . .",
    6: "S S S S S S I . . . . . . . . .",
    11: "S S S S S S I I I I I I . . . .",
    12: "X X X X X X S S S S S S I . . .",
    15: "X X X X X X S S S S S S I I I I",
}
DISTANCES = {8: [8, 7, 6, 5, 4, 3, 2, 1, 0], 13: [8, 7, 6, 5, 4, 3, 7, 6, 5, 4, 3, 2, 1, 0],
             15: [8, 7, 6, 5, 4, 3, 8, 7, 6, 5, 4, 3, 3, 2, 1, 0]}


def test_position_vectors():
    assert dca.key_positions(POS, DC).tolist() == P_K
    assert dca.succ_positions(POS, DC).tolist() == P_SUCC
    assert dca.inter_positions(POS, DC).tolist() == [8] * 16
    assert DC.period == 6


def _query_position(i: int, j: int) -> int:
    sel = dca.selector(np.array([i]), np.array([j]), DC)[0, 0]
    vec = {dca.INTRA: dca.key_positions, dca.SUCC: dca.succ_positions, dca.INTER: dca.inter_positions}[int(sel)]
    return int(vec(np.array([i]), DC)[0])


def test_set_per_pair_and_relative_distances():
    sel = dca.selector(POS, POS, DC)
    letter = {dca.INTRA: "I", dca.SUCC: "S", dca.INTER: "X"}
    for i, row in ROWS.items():
        got = " ".join(letter[int(sel[i, j])] if j <= i else "." for j in range(16))
        assert got == row, i
    p_k = dca.key_positions(POS, DC)
    for i, want in DISTANCES.items():
        assert [_query_position(i, j) - int(p_k[j]) for j in range(i + 1)] == want, i
    all_d = [_query_position(i, j) - int(p_k[j]) for i in range(16) for j in range(i + 1)]
    assert max(all_d) == DC.chunk_size and min(all_d) == 0


def test_decode_at_15_uses_the_documented_sets():
    sel = dca.selector(np.array([15]), POS, DC)[0]
    assert np.flatnonzero(sel == dca.INTRA).tolist() == [12, 13, 14, 15]
    assert np.flatnonzero(sel == dca.SUCC).tolist() == list(range(6, 12))
    assert np.flatnonzero(sel == dca.INTER).tolist() == list(range(0, 6))
    assert dca.key_positions(np.array([15]), DC)[0] == 3 and dca.succ_positions(np.array([15]), DC)[0] == 8


def test_temperature():
    with_l0 = DualChunkConfig(16, 4, original_max_position_embeddings=32)
    assert dca.temperature(np.array([1, 32, 64]), with_l0).tolist() == pytest.approx([1.0, 1.0, 1 + 0.1 * np.log(2)])
    assert dca.temperature(np.array([10_000]), DC).tolist() == [1.0]  # no L0: no temperature


def _cfg(dc):
    return ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=4, dual_chunk=dc)


def test_feed_for_prefill_and_decode():
    dc = DualChunkConfig(8, 2, original_max_position_embeddings=10)
    feed_fn = DcaFeed(_cfg(dc), max_seq_len=20)
    pre = prefill_feed([list(range(14)), [1, 2, 3]], 20, 0)  # right-padded batch
    out = feed_fn(pre, np.zeros(2, dtype=np.int64))
    assert out[io_spec.DCA_POS_KEY][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1]
    assert out[io_spec.DCA_Q_CHUNK][0].tolist() == [0] * 6 + [1] * 6 + [2] * 2
    assert out[io_spec.DCA_K_CHUNK].shape == (2, 20 + 14)
    assert out[io_spec.DCA_K_CHUNK][0, :20].tolist() == (np.arange(20) // 6).tolist()
    # sf from each row's own prompt length: 14 -> 1 + 0.1 ln 1.4; 3 -> 1.
    assert out[io_spec.DCA_SCALE].tolist() == pytest.approx([1 + 0.1 * np.log(1.4), 1.0])
    lengths = np.array([14, 3])
    dec = feed_fn(decode_feed(np.array([5, 6]), lengths, 20), lengths)
    assert dec[io_spec.DCA_POS_KEY].tolist() == [[2], [3]]
    assert dec[io_spec.DCA_POS_Q_SUCC].tolist() == [[8], [8]]  # min(6 + 2, 8), min(6 + 3, 8)
    assert dec[io_spec.DCA_SCALE].tolist() == pytest.approx([1 + 0.1 * np.log(1.5), 1.0])


def test_indices_stay_inside_the_table():
    """max_seq_len within one period: the table only has max_seq_len rows; unused indices are clamped."""
    dc = DualChunkConfig(64, 8)
    assert dca.table_rows(dc, 40) == 40 and dca.table_rows(dc, 100) == 65
    out = DcaFeed(_cfg(dc), 40)(prefill_feed([list(range(40))], 40, 0), np.zeros(1, dtype=np.int64))
    for name in (io_spec.DCA_POS_KEY, io_spec.DCA_POS_Q_SUCC, io_spec.DCA_POS_Q_INTER):
        assert out[name].max() < 40
    assert (out[io_spec.DCA_POS_KEY][0] == np.arange(40)).all()
