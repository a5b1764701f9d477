"""An independent Qwen2 forward in float64 numpy, with Dual Chunk Attention: the reference where
transformers has no implementation.

Written from docs/long_context.md (the DCA rules) and the checkpoint's tensors. It shares no code with
the exported graph's (qwen2edge.graphs, qwen2edge.positions) nor with the config parser: it reads the
bundle's model config as a plain dict, and recomputes every pair's rotary positions, the rotations and
the temperature from their definitions, one query at a time (O(n^2) per forward, O(n^3) per greedy
run: meant for checking exports, not for speed). Memory: 8 bytes per parameter.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

NAME = "qwen2edge float64 reference (numpy, pair by pair; transformers has no Dual Chunk Attention)"


class NaiveQwen2:
    """Logits and hidden states of one Qwen2 model, with or without DCA, in float64.

    `config` is a bundle manifest's `model_config`; `weights` maps Hugging Face tensor names to arrays
    (lm_head.weight may be absent for tied embeddings)."""

    name = NAME
    kind = "float64"

    def __init__(self, config: Mapping[str, Any], weights: Mapping[str, Any]):
        c = dict(config)
        if c.get("rope_scaling"):
            raise ValueError("the float64 reference implements plain RoPE and DCA, not YaRN")
        self.w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
        self.heads, self.kv_heads = int(c["num_attention_heads"]), int(c["num_key_value_heads"])
        self.head_dim = int(c["head_dim"])
        self.rot = int(self.head_dim * float(c.get("partial_rotary_factor", 1.0))) // 2 * 2
        self.base = float(c["rope_theta"])
        self.eps = float(c["rms_norm_eps"])
        self.layers = int(c["num_hidden_layers"])
        dca = c.get("dual_chunk")
        self.chunk = int(dca["chunk_size"]) if dca else None
        self.local = int(dca["local_size"]) if dca else None
        self.dca_l0 = int(dca.get("original_max_position_embeddings") or 0) if dca else 0

    # -- positions (docs/long_context.md, "Dual Chunk Attention") --------------------------------

    def pair_positions(self, i: int, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query position, key position) for query token i against each key token j <= i."""
        j = np.asarray(j, dtype=np.int64)
        if self.chunk is None:
            return np.full(j.shape, i, dtype=np.int64), j
        s, c = self.chunk - self.local, self.chunk
        gap = i // s - j // s
        q = np.where(gap == 0, i % s, np.where(gap == 1, min(s + i % s, c), min(2 * s - 1, c)))
        return q.astype(np.int64), j % s

    def temperature(self, length: int) -> float:
        """sf(L) = max(1, 1 + 0.1 ln(L / L0)); 1 without L0 (or without DCA)."""
        if not self.dca_l0:
            return 1.0
        return max(1.0, 1.0 + 0.1 * math.log(length / self.dca_l0))

    def step_temperatures(self, prompt_len: int, total: int) -> np.ndarray:
        """The sf each token gets when `prompt_len` tokens are prefilled, then the rest decoded one by one
        (a cached key keeps the temperature of the step that wrote it)."""
        return np.array([self.temperature(prompt_len) if t < prompt_len else self.temperature(t + 1)
                         for t in range(total)])

    # -- the model --------------------------------------------------------------------------------

    def _rotate(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """x [n, H, D] with row r rotated to position pos[r] (first `rot` channels, halves layout)."""
        half = self.rot // 2
        theta = self.base ** (-np.arange(0, self.rot, 2, dtype=np.float64) / self.rot)
        ang = np.asarray(pos, dtype=np.float64)[:, None, None] * theta  # [n, 1, R/2]
        a, b, rest = x[..., :half], x[..., half:self.rot], x[..., self.rot:]
        return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang), rest], axis=-1)

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        return self.w[name] * x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps)

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = x @ self.w[name + ".weight"].T
        return y + self.w[name + ".bias"] if name + ".bias" in self.w else y

    def _attention(self, x: np.ndarray, layer: int, sf: np.ndarray) -> np.ndarray:
        n, d, g = x.shape[0], self.head_dim, self.heads // self.kv_heads
        pre = f"model.layers.{layer}.self_attn."
        q = self._linear(x, pre + "q_proj").reshape(n, self.heads, d)
        k = np.repeat(self._linear(x, pre + "k_proj").reshape(n, self.kv_heads, d), g, axis=1)  # [n, H, D]
        v = np.repeat(self._linear(x, pre + "v_proj").reshape(n, self.kv_heads, d), g, axis=1)
        out = np.zeros((n, self.heads, d))
        for i in range(n):
            keys = np.arange(i + 1)
            pq, pk = self.pair_positions(i, keys)
            qi = self._rotate(np.broadcast_to(q[i], (i + 1, self.heads, d)), pq)  # query i, once per key
            kj = self._rotate(k[: i + 1], pk)
            logits = (qi * kj).sum(-1) * (sf[i] * sf[: i + 1, None] / math.sqrt(d))  # [i+1, H]
            p = np.exp(logits - logits.max(axis=0))
            out[i] = np.einsum("jh,jhd->hd", p / p.sum(axis=0), v[: i + 1])
        return self._linear(out.reshape(n, self.heads * d), pre + "o_proj")

    def forward(self, ids: list[int], sf: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """(logits [n, V], hidden states [embeddings, after each layer, last after the final norm]).
        `sf[t]` is token t's temperature (default: one prefill of all of `ids`)."""
        n = len(ids)
        sf = np.full(n, self.temperature(n)) if sf is None else np.asarray(sf, dtype=np.float64)
        h = self.w["model.embed_tokens.weight"][list(ids)]
        hidden = [h]
        for layer in range(self.layers):
            pre = f"model.layers.{layer}."
            h = h + self._attention(self._norm(h, pre + "input_layernorm.weight"), layer, sf)
            a = self._norm(h, pre + "post_attention_layernorm.weight")
            gate = self._linear(a, pre + "mlp.gate_proj")
            h = h + self._linear(gate / (1 + np.exp(-gate)) * self._linear(a, pre + "mlp.up_proj"), pre + "mlp.down_proj")
            hidden.append(h)
        h = self._norm(h, "model.norm.weight")
        hidden[-1] = h
        head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        return h @ head.T, hidden

    def logits(self, ids: list[int], prompt_len: int | None = None) -> np.ndarray:
        """[len(ids), V]: `prompt_len` tokens prefilled (default all), the rest decoded one by one."""
        n = len(ids)
        return self.forward(ids, self.step_temperatures(prompt_len or n, n))[0]

    def greedy(self, ids: list[int], steps: int) -> list[int]:
        """`steps` greedy tokens after a prefill of `ids` (end-of-sequence ids are not special here)."""
        seq = list(ids)
        for _ in range(steps):
            seq.append(int(np.argmax(self.logits(seq, len(ids))[-1])))
        return seq[len(ids):]

    def hidden_states(self, ids: list[int]) -> list[np.ndarray]:
        """Hidden states of one prefill over `ids`, laid out like transformers' output_hidden_states."""
        return self.forward(ids)[1]

    def weights(self) -> dict[str, np.ndarray]:
        return dict(self.w)

    def replace_weights(self, new: Mapping[str, Any]) -> None:
        self.w.update({k: np.asarray(v, dtype=np.float64) for k, v in new.items()})
