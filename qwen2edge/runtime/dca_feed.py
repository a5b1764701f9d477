"""Host side of Dual Chunk Attention: the extra graph inputs for one prefill/decode step (torch-free)."""

from __future__ import annotations

import numpy as np

from .. import io_spec
from ..config import ModelConfig
from ..errors import InputError
from ..positions import dca


class DcaFeed:
    """`(feed, write_pos) -> DCA inputs` for a step whose base feed holds position_ids / attention_mask.

    Cache slot j holds the token at position j (the generator's right-padded layout), so the past
    slots' chunk ids are fixed and computed once.
    """

    def __init__(self, config: ModelConfig, max_seq_len: int):
        if config.dual_chunk is None:
            raise InputError("this bundle has no dual_chunk_attention_config: re-export it with "
                             "`qwen2edge export --dca-chunk-size C --dca-local-size W`")
        self.dc = config.dual_chunk
        self.max_seq_len = max_seq_len
        # Indices beyond the table only occur for pairs that can never be selected (see dca.table_rows).
        self.max_index = dca.table_rows(self.dc, max_seq_len) - 1
        self.past_chunks = dca.chunk_ids(np.arange(max_seq_len), self.dc)

    @property
    def same_scale_until(self) -> int:
        """The longest sequence whose steps all run at temperature 1 (sf(L) = 1 for L <= L0). Past it a step's
        temperature follows its length and is one value per row, so a step over several positions, or keys
        reused from another step, would not equal one position per step."""
        l0 = self.dc.original_max_position_embeddings
        return min(l0, self.max_seq_len) if l0 > 0 else self.max_seq_len

    def __call__(self, feed: dict[str, np.ndarray], write_pos: np.ndarray) -> dict[str, np.ndarray]:
        pos = feed[io_spec.POSITION_IDS].astype(np.int64)  # [B, T] true positions
        b, t = pos.shape
        cache_len = feed[io_spec.ATTENTION_MASK].shape[1] - t  # the cache's capacity this step
        q_chunk = dca.chunk_ids(pos, self.dc)
        k_chunk = np.empty((b, cache_len + t), dtype=np.int64)
        k_chunk[:, :cache_len] = self.past_chunks[:cache_len]
        k_chunk[:, cache_len:] = q_chunk
        # The temperature follows the sequence length after this step (the prompt length at prefill).
        new_valid = feed[io_spec.ATTENTION_MASK][:, cache_len:].sum(axis=1)
        length = np.asarray(write_pos, dtype=np.int64).reshape(b) + new_valid
        return {
            io_spec.DCA_POS_KEY: np.minimum(dca.key_positions(pos, self.dc), self.max_index),
            io_spec.DCA_POS_Q_SUCC: np.minimum(dca.succ_positions(pos, self.dc), self.max_index),
            io_spec.DCA_POS_Q_INTER: np.minimum(dca.inter_positions(pos, self.dc), self.max_index),
            io_spec.DCA_Q_CHUNK: q_chunk,
            io_spec.DCA_K_CHUNK: k_chunk,
            io_spec.DCA_SCALE: dca.temperature(length, self.dc),
        }
