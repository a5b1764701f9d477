"""The Qwen2 decoder written for export (gpt-fast style): static KV-cache inputs, rotary tables
gathered by position, fp32 islands for RMSNorm / softmax / the residual stream.

Shapes: B batch, T current tokens, L cache slots handed in (past_len <= max_seq_len), H query heads, Hkv key/value heads,
G = H / Hkv, D head_dim, R rotary dim, C hidden size, V vocab.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import io_spec
from ..config import ModelConfig
from ..positions import dca
from ..positions.rope import rotary_tables

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MASK_VALUE = -1e9  # large finite negative: a fully masked (padding) row must not turn into NaN


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 whatever the export dtype (fp16 overflows in the sum of squares)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        x = _to(x, torch.float32)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class _ReshapeKeep(torch.autograd.Function):
    """x.reshape(*x.shape[:keep], *dims) that exports as ONE ONNX Reshape whose shape is a constant
    ([0] * keep + dims; 0 copies the input's dimension). The tracer would otherwise rebuild the
    dynamic leading dimensions from Shape/Gather/Unsqueeze/Concat nodes at every reshape."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: int, dims: tuple[int, ...]) -> Tensor:  # noqa: ARG004
        return x.reshape(*x.shape[:keep], *dims)

    @staticmethod
    def symbolic(g, x, keep: int, dims: tuple[int, ...]):
        lead = [0] * keep
        if -1 not in dims:
            lead[-1] = -1  # the last kept dimension is inferred (torch's ONNX shape inference wants one -1)
        shape = g.op("Constant", value_t=torch.tensor(lead + list(dims), dtype=torch.int64))
        return g.op("Reshape", x, shape)


def reshape_keep(x: Tensor, keep: int, *dims: int) -> Tensor:
    """Keep the first `keep` (dynamic) dimensions, reshape the rest to `dims` (one may be -1)."""
    return _ReshapeKeep.apply(x, keep, tuple(dims))


def _to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast only when the dtype differs (a same-dtype .to() still traces to a Cast node)."""
    return x if x.dtype == dtype else x.to(dtype)


def signed_sin(sin: np.ndarray) -> np.ndarray:
    """sin table [P, R] with its first half negated: rotate_half(x) * sin == swap_halves(x) * signed_sin,
    which saves the Neg of rotate_half (negation is exact, so the result is bit for bit the same)."""
    half = sin.shape[-1] // 2
    return np.concatenate([-sin[:, :half], sin[:, half:]], axis=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, rot: int) -> Tensor:
    """Rotate the first `rot` channels of x [B, h, T, D] by cos / signed sin [B, 1, T, rot]; the rest
    pass through. `rot` is a Python int so the split points are constants of the graph."""
    d = x.shape[-1]
    xr, xp = (x, None) if rot == d else x.split([rot, d - rot], dim=-1)
    x1, x2 = xr.split([rot // 2, rot // 2], dim=-1)
    out = xr * cos + torch.cat((x2, x1), dim=-1) * sin
    return out if xp is None else torch.cat((out, xp), dim=-1)


def _exact_power_of_two(v: float) -> bool:
    m, _ = math.frexp(v)
    return m == 0.5


class Attention(nn.Module):
    """q/k/v run as ONE projection (weights concatenated along the output axis, a constant the
    exporter folds; one MatMul + Split in the graph) and q and k are rotated together."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.rot = cfg.rotary_dim
        c = cfg.hidden_size
        self.q_proj = nn.Linear(c, self.h * self.d, bias=True)
        self.k_proj = nn.Linear(c, self.hkv * self.d, bias=True)
        self.v_proj = nn.Linear(c, self.hkv * self.d, bias=True)
        self.o_proj = nn.Linear(self.h * self.d, c, bias=False)
        # 1/sqrt(D) folds into the q weights when it is a power of two (D = 16, 64, 256: exact, so
        # the result is unchanged bit for bit); otherwise it stays one Mul on q.
        self.q_scale = self.d ** -0.5
        self.fold_q_scale = _exact_power_of_two(self.q_scale)

    def _qkv(self, x: Tensor) -> Tensor:
        """[B, H + 2 Hkv, T, D]: q heads (already times 1/sqrt(D) when folded), then k, then v, unrotated."""
        s = self.q_scale if self.fold_q_scale else 1.0
        w = torch.cat((self.q_proj.weight * s, self.k_proj.weight, self.v_proj.weight))
        b = torch.cat((self.q_proj.bias * s, self.k_proj.bias, self.v_proj.bias))
        return reshape_keep(F.linear(x, w, b), 2, self.h + 2 * self.hkv, self.d).transpose(1, 2)

    def forward(self, x: Tensor, rope: tuple[Tensor, ...], past_k: Tensor, past_v: Tensor,
                mask: tuple) -> tuple[Tensor, Tensor, Tensor]:
        cos, sin = rope
        bias_past, bias_new, cache_len = mask  # [B, 1, 1, L], [B, 1, G*T, T], L (computed once per graph)
        qk, v = self._qkv(x).split([self.h + self.hkv, self.hkv], dim=1)
        q, k = _to(apply_rotary(qk, cos, sin, self.rot), x.dtype).split([self.h, self.hkv], dim=1)
        if not self.fold_q_scale:
            q = q * self.q_scale
        # GQA without copying K/V per head: each KV head's G query heads are G*T rows of one 4-D MatMul
        # (row g*T + t), so the cache and the new keys/values are used as they are (no Unsqueeze).
        qg = reshape_keep(q, 1, self.hkv, -1, self.d)  # [B, Hkv, G*T, D]
        # Scores against the cache and against the current tokens are computed apart and joined
        # after the matmul, so the static cache is only read, never concatenated (copied).
        s_past = torch.matmul(qg, past_k.transpose(-1, -2))  # [B, Hkv, G*T, L]
        s_new = torch.matmul(qg, k.transpose(-1, -2))  # [B, Hkv, G*T, T]
        scores = torch.cat((_to(s_past, torch.float32) + bias_past, _to(s_new, torch.float32) + bias_new), dim=-1)
        probs = _to(torch.softmax(scores, dim=-1), x.dtype)  # [B, Hkv, G*T, L+T]
        out = torch.matmul(probs[..., :cache_len], past_v) + torch.matmul(probs[..., cache_len:], v)  # [B, Hkv, G*T, D]
        out = reshape_keep(reshape_keep(out, 1, self.h, -1, self.d).transpose(1, 2), 2, self.h * self.d)  # [B, T, H*D]
        return self.o_proj(out), k, v


def _pick(scores: Tensor, is_intra: Tensor, is_succ: Tensor) -> Tensor:
    """scores [B, Hkv, G, 3, T, K] -> [B, Hkv, G, T, K], each pair's logit from its selected set."""
    return torch.where(is_intra, scores[:, :, :, 0], torch.where(is_succ, scores[:, :, :, 1], scores[:, :, :, 2]))


class DcaAttention(Attention):
    """Dual Chunk Attention over the same static cache (spec section 4).

    The cache holds keys rotated by P_k and scaled by the temperature of their step. The three query
    variants (intra / successive / inter) are stacked into ONE MatMul against the cache and the new
    keys; a per-pair selector (chunk distance, computed from host inputs) picks which logit each
    pair uses before the single softmax, so the graph stays static-shape and branch-free.
    """

    def forward(self, x: Tensor, rope: tuple[Tensor, ...], past_k: Tensor, past_v: Tensor,
                mask: tuple) -> tuple[Tensor, Tensor, Tensor]:
        cos_k, sin_k, cos_s, sin_s, cos_x, sin_x, scale, sel_past, sel_new = rope
        bias_past, bias_new, cache_len = mask  # [B, 1, 1, 1, L], [B, 1, 1, T, T], L
        b, t, _ = x.shape
        g = self.h // self.hkv
        q, k, v = self._qkv(x).split([self.h, self.hkv, self.hkv], dim=1)  # [B, H, T, D], [B, Hkv, T, D] x2
        k = _to(apply_rotary(k, cos_k, sin_k, self.rot) * scale, x.dtype)  # cached as rotated by P_k, times sf
        qs = torch.stack((apply_rotary(q, cos_k, sin_k, self.rot), apply_rotary(q, cos_s, sin_s, self.rot),
                          apply_rotary(q, cos_x, sin_x, self.rot)), dim=2)  # [B, H, 3, T, D]
        q_scale = scale.unsqueeze(-1) if self.fold_q_scale else scale.unsqueeze(-1) * self.q_scale
        qs = _to(qs * q_scale, x.dtype)
        qs = reshape_keep(qs, 1, self.hkv, -1, self.d)  # [B, Hkv, G*3*T, D]: one plain batched MatMul
        s_past = torch.matmul(qs, past_k.transpose(-1, -2)).view(b, self.hkv, g, 3, t, cache_len)
        s_new = torch.matmul(qs, k.transpose(-1, -2)).view(b, self.hkv, g, 3, t, t)
        s_past = _pick(_to(s_past, torch.float32), *sel_past) + bias_past  # [B, Hkv, G, T, L]
        s_new = _pick(_to(s_new, torch.float32), *sel_new) + bias_new  # [B, Hkv, G, T, T]
        probs = _to(torch.softmax(torch.cat((s_past, s_new), dim=-1), dim=-1), x.dtype)
        out = torch.matmul(probs[..., :cache_len], past_v.unsqueeze(2)) + torch.matmul(
            probs[..., cache_len:], v.unsqueeze(2))  # [B, Hkv, G, T, D]
        out = reshape_keep(reshape_keep(out, 1, self.h, -1, self.d).transpose(1, 2), 2, self.h * self.d)
        return self.o_proj(out), k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # gate and up read the same input: one MatMul over the concatenated weights, then Split.
        gate, up = F.linear(x, torch.cat((self.gate_proj.weight, self.up_proj.weight))).split(
            [self.gate_proj.out_features, self.up_proj.out_features], dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # The attention kind is fixed at construction: forward has no data-dependent branches.
        self.self_attn = DcaAttention(cfg) if cfg.dual_chunk is not None else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h: Tensor, rope, past_k, past_v, mask, dtype):
        a, k, v = self.self_attn(_to(self.input_layernorm(h), dtype), rope, past_k, past_v, mask)
        h = h + _to(a, torch.float32)  # the residual stream stays fp32
        h = h + _to(self.mlp(_to(self.post_attention_layernorm(h), dtype)), torch.float32)
        return h, k, v


class Qwen2Graph(nn.Module):
    """forward(input_ids, position_ids, attention_mask, logits_index, [*dca inputs], *past) -> (logits, *presents).

    Inputs/outputs follow qwen2edge.io_spec; `past` alternates past_key.i, past_value.i. With a
    dual_chunk config the io_spec.DCA_INPUTS come before the cache.
    With expose_hidden_states (debug exports only) the outputs end with hidden_state.0..L, laid out
    like transformers' output_hidden_states so per-layer drift can be compared one to one.
    """

    def __init__(self, cfg: ModelConfig, max_seq_len: int, dtype: str = "fp32", expose_hidden_states: bool = False):
        super().__init__()
        self.cfg, self.max_seq_len, self.dtype = cfg, max_seq_len, TORCH_DTYPES[dtype]
        self.expose_hidden_states = expose_hidden_states
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.dca = cfg.dual_chunk is not None
        rows = dca.table_rows(cfg.dual_chunk, max_seq_len) if cfg.dual_chunk is not None else max_seq_len
        cos, sin = rotary_tables(cfg, rows)
        self.register_buffer("rope_cos", torch.from_numpy(cos), persistent=False)  # [L, R] fp32
        # sin with its first half negated (signed_sin): rotate_half becomes a swap of halves.
        self.register_buffer("rope_sin", torch.from_numpy(signed_sin(sin)), persistent=False)

    def cast_weights(self) -> "Qwen2Graph":
        """Linear/embedding weights to the export dtype; norms and rotary tables stay fp32."""
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                mod.to(self.dtype)
        return self

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [B, 1, T, R] gathered for positions [B, T]."""
        return self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)

    def _dca_rope(self, cache_len: int, pos_key: Tensor, pos_succ: Tensor, pos_inter: Tensor, q_chunk: Tensor,
                  k_chunk: Tensor, scale: Tensor) -> tuple:
        sel = torch.clamp(q_chunk[:, :, None] - k_chunk[:, None, :], dca.INTRA, dca.INTER)  # [B, T, L+T]
        sel = sel[:, None, None]  # [B, 1, 1, T, L+T]
        is_intra, is_succ = sel == dca.INTRA, sel == dca.SUCC
        sel_past = (is_intra[..., :cache_len], is_succ[..., :cache_len])
        sel_new = (is_intra[..., cache_len:], is_succ[..., cache_len:])
        return (*self._rope(pos_key), *self._rope(pos_succ), *self._rope(pos_inter),
                scale[:, None, None, None], sel_past, sel_new)

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, logits_index: Tensor,
                *rest: Tensor) -> tuple[Tensor, ...]:
        n_dca = len(io_spec.DCA_INPUTS) if self.dca else 0
        past = rest[n_dca:]
        cache_len = past[0].shape[2]  # a graph dimension (past_len), not max_seq_len: the runtime sizes it
        rope = self._dca_rope(cache_len, *rest[:n_dca]) if self.dca else self._rope(position_ids)
        valid = attention_mask > 0
        # Past slots: visible when valid. Current tokens: valid and not after the query (by position).
        bias_past = torch.where(valid[:, :cache_len], 0.0, MASK_VALUE)[:, None, None, :]  # [B, 1, 1, L]
        causal = position_ids[:, None, :] <= position_ids[:, :, None]  # [B, Tq, Tk]
        new_ok = causal & valid[:, cache_len:][:, None, :]  # [B, Tq, Tk]
        bias_new = torch.where(new_ok, 0.0, MASK_VALUE)[:, None]  # [B, 1, T, T]
        if self.dca:  # DCA scores are [B, Hkv, G, T, K]
            mask = (bias_past.unsqueeze(1), bias_new.unsqueeze(1), cache_len)
        else:  # plain scores are [B, Hkv, G*T, K], row g*T + t: the new-token bias tiles G times, once per graph
            mask = (bias_past, bias_new.repeat(1, 1, self.cfg.num_attention_heads // self.cfg.num_key_value_heads, 1),
                    cache_len)
        h = _to(self.embed_tokens(input_ids), torch.float32)  # [B, T, C] residual stream in fp32
        presents, hidden = [], [h]
        for i, layer in enumerate(self.layers):
            h, k, v = layer(h, rope, past[2 * i], past[2 * i + 1], mask, self.dtype)
            presents += [k, v]
            hidden.append(h)
        idx = logits_index.unsqueeze(-1).expand(-1, -1, h.shape[-1])  # [B, N, C]
        h = _to(self.norm(torch.gather(h, 1, idx)), self.dtype)  # [B, N, C]
        logits = _to(self.lm_head(h), torch.float32)  # [B, N, V]
        if not self.expose_hidden_states:
            return (logits, *presents)
        # transformers reports the last layer after the final norm; mirror that (all positions).
        hidden[-1] = self.norm(hidden[-1])
        return (logits, *presents, *hidden)
