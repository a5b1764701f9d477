"""An independent, naive O(n^2) Qwen2 forward with Dual Chunk Attention, in float64 numpy.

Written from ../shared/docs/long_context.md (sections 2-3) and the checkpoint's own tensors; it shares
no code with qwen2edge.graphs (nor with qwen2edge.config): positions, rotations, chunk sets and the
temperature are all recomputed here, pair by pair, the slow and obvious way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


class NaiveQwen2:
    """Full-sequence logits for one checkpoint directory, with or without DCA."""

    def __init__(self, model_dir: str | Path):
        from safetensors.numpy import load_file

        model_dir = Path(model_dir)
        self.cfg = json.loads((model_dir / "config.json").read_text())
        self.w = {k: v.astype(np.float64) for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
        c = self.cfg
        self.heads, self.kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.heads
        rope = c.get("rope_parameters") or {}
        self.base = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
        self.eps = float(c.get("rms_norm_eps", 1e-6))
        self.layers = c["num_hidden_layers"]
        dca = c.get("dual_chunk_attention_config")
        self.chunk = int(dca["chunk_size"]) if dca else None
        self.local = int(dca["local_size"]) if dca else None
        self.dca_l0 = int(dca.get("original_max_position_embeddings") or 0) if dca else 0

    # -- the positions each pair uses (spec 2.2 / 2.3) -------------------------------------------

    def pair_positions(self, i: int, j: int) -> tuple[int, int]:
        """(query position, key position) for query token i attending to key token j <= i."""
        if self.chunk is None:
            return i, j
        s, c = self.chunk - self.local, self.chunk
        gap = i // s - j // s
        if gap == 0:
            q = i % s
        elif gap == 1:
            q = min(s + i % s, c)
        else:
            q = min(2 * s - 1, c)
        return q, j % s

    def temperature(self, length: int) -> float:
        """sf(L) = max(1, 1 + 0.1 ln(L / L0)) (spec 2.5); 1 without L0."""
        if not self.dca_l0:
            return 1.0
        return max(1.0, 1.0 + 0.1 * math.log(length / self.dca_l0))

    def step_temperatures(self, prompt_len: int, total: int) -> np.ndarray:
        """The sf each token gets when `prompt_len` tokens are prefilled, then the rest decoded one by one."""
        return np.array([self.temperature(prompt_len) if t < prompt_len else self.temperature(t + 1)
                         for t in range(total)])

    # -- the model ------------------------------------------------------------------------------

    def _rotate(self, x: np.ndarray, p: int) -> np.ndarray:
        """x [..., D] rotated to position p (neox halves)."""
        d = self.head_dim
        theta = self.base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        ang = p * theta
        a, b = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], axis=-1)

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        return self.w[name] * x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps)

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = x @ self.w[name + ".weight"].T
        return y + self.w[name + ".bias"] if name + ".bias" in self.w else y

    def _attention(self, x: np.ndarray, layer: int, sf: np.ndarray) -> np.ndarray:
        n, d, g = x.shape[0], self.head_dim, self.heads // self.kv_heads
        pre = f"model.layers.{layer}.self_attn."
        q = self._linear(x, pre + "q_proj").reshape(n, self.heads, d)
        k = self._linear(x, pre + "k_proj").reshape(n, self.kv_heads, d)
        v = self._linear(x, pre + "v_proj").reshape(n, self.kv_heads, d)
        out = np.zeros((n, self.heads, d))
        for i in range(n):
            for h in range(self.heads):
                kv = h // g
                logits = np.empty(i + 1)
                for j in range(i + 1):
                    pq, pk = self.pair_positions(i, j)
                    dot = self._rotate(q[i, h], pq) @ self._rotate(k[j, kv], pk)
                    logits[j] = dot * sf[i] * sf[j] / math.sqrt(d)
                p = np.exp(logits - logits.max())
                out[i, h] = (p / p.sum()) @ v[: i + 1, kv]
        return self._linear(out.reshape(n, self.heads * d), pre + "o_proj")

    def logits(self, ids: list[int], sf: np.ndarray | None = None) -> np.ndarray:
        """[len(ids), V] logits; `sf[t]` is token t's temperature (default: one prefill of everything)."""
        n = len(ids)
        sf = np.full(n, self.temperature(n)) if sf is None else np.asarray(sf, dtype=np.float64)
        h = self.w["model.embed_tokens.weight"][ids]
        for layer in range(self.layers):
            pre = f"model.layers.{layer}."
            h = h + self._attention(self._norm(h, pre + "input_layernorm.weight"), layer, sf)
            a = self._norm(h, pre + "post_attention_layernorm.weight")
            gate = self._linear(a, pre + "mlp.gate_proj")
            h = h + self._linear(gate / (1 + np.exp(-gate)) * self._linear(a, pre + "mlp.up_proj"), pre + "mlp.down_proj")
        h = self._norm(h, "model.norm.weight")
        head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        return h @ head.T
