"""The Qwen2 decoder written for export (gpt-fast style): static KV-cache inputs, rotary tables
gathered by position, fp32 islands for RMSNorm / softmax / the residual stream.

Shapes: B batch, T current tokens, L cache slots handed in (past_len <= max_seq_len), H query heads, Hkv key/value heads,
G = H / Hkv, D head_dim, R rotary dim, C hidden size, V vocab.
"""

from __future__ import annotations

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
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first R channels of x [B, h, T, D] by cos/sin [B, 1, T, R]; the rest pass through."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr, xp = x[..., :rot], x[..., rot:]
    return torch.cat((xr * cos + rotate_half(xr) * sin, xp), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        c = cfg.hidden_size
        self.q_proj = nn.Linear(c, self.h * self.d, bias=True)
        self.k_proj = nn.Linear(c, self.hkv * self.d, bias=True)
        self.v_proj = nn.Linear(c, self.hkv * self.d, bias=True)
        self.o_proj = nn.Linear(self.h * self.d, c, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, ...], past_k: Tensor, past_v: Tensor,
                bias_past: Tensor, bias_new: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cos, sin = rope
        b, t, _ = x.shape
        g = self.h // self.hkv
        q = self.q_proj(x).view(b, t, self.h, self.d).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(b, t, self.hkv, self.d).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(b, t, self.hkv, self.d).transpose(1, 2)  # [B, Hkv, T, D]
        q = apply_rotary(q, cos, sin).to(x.dtype)
        k = apply_rotary(k, cos, sin).to(x.dtype)
        q = q * (self.d ** -0.5)
        qg = q.reshape(b, self.hkv, g, t, self.d)  # [B, Hkv, G, T, D]; GQA without copying K/V per head
        # Scores against the cache and against the current tokens are computed apart and joined
        # after the matmul, so the static cache is only read, never concatenated (copied).
        s_past = torch.matmul(qg, past_k.unsqueeze(2).transpose(-1, -2))  # [B, Hkv, G, T, L]
        s_new = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2))  # [B, Hkv, G, T, T]
        scores = torch.cat((s_past.float() + bias_past, s_new.float() + bias_new), dim=-1)  # [B, Hkv, G, T, L+T]
        probs = torch.softmax(scores, dim=-1).to(x.dtype)
        cache_len = past_k.shape[2]
        out = torch.matmul(probs[..., :cache_len], past_v.unsqueeze(2)) + torch.matmul(
            probs[..., cache_len:], v.unsqueeze(2))  # [B, Hkv, G, T, D]
        out = out.reshape(b, self.h, t, self.d).transpose(1, 2).reshape(b, t, self.h * self.d)  # [B, T, H*D]
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
                bias_past: Tensor, bias_new: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cos_k, sin_k, cos_s, sin_s, cos_x, sin_x, scale, sel_past, sel_new = rope
        b, t, _ = x.shape
        g = self.h // self.hkv
        cache_len = past_k.shape[2]
        q = self.q_proj(x).view(b, t, self.h, self.d).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(b, t, self.hkv, self.d).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(b, t, self.hkv, self.d).transpose(1, 2)  # [B, Hkv, T, D]
        k = (apply_rotary(k, cos_k, sin_k) * scale).to(x.dtype)  # cached as rotated by P_k, times sf
        qs = torch.stack((apply_rotary(q, cos_k, sin_k), apply_rotary(q, cos_s, sin_s),
                          apply_rotary(q, cos_x, sin_x)), dim=2)  # [B, H, 3, T, D]
        qs = (qs * (scale.unsqueeze(-1) * (self.d ** -0.5))).to(x.dtype)
        qs = qs.reshape(b, self.hkv, g * 3 * t, self.d)  # [B, Hkv, G*3*T, D]: one plain batched MatMul
        s_past = torch.matmul(qs, past_k.transpose(-1, -2)).view(b, self.hkv, g, 3, t, cache_len)
        s_new = torch.matmul(qs, k.transpose(-1, -2)).view(b, self.hkv, g, 3, t, t)
        s_past = _pick(s_past.float(), *sel_past) + bias_past  # [B, Hkv, G, T, L]
        s_new = _pick(s_new.float(), *sel_new) + bias_new  # [B, Hkv, G, T, T]
        probs = torch.softmax(torch.cat((s_past, s_new), dim=-1), dim=-1).to(x.dtype)
        out = torch.matmul(probs[..., :cache_len], past_v.unsqueeze(2)) + torch.matmul(
            probs[..., cache_len:], v.unsqueeze(2))  # [B, Hkv, G, T, D]
        out = out.reshape(b, self.h, t, self.d).transpose(1, 2).reshape(b, t, self.h * self.d)
        return self.o_proj(out), k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # The attention kind is fixed at construction: forward has no data-dependent branches.
        self.self_attn = DcaAttention(cfg) if cfg.dual_chunk is not None else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h: Tensor, rope, past_k, past_v, bias_past, bias_new, dtype):
        a, k, v = self.self_attn(self.input_layernorm(h).to(dtype), rope, past_k, past_v, bias_past, bias_new)
        h = h + a.float()  # the residual stream stays fp32
        h = h + self.mlp(self.post_attention_layernorm(h).to(dtype)).float()
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
        self.register_buffer("rope_sin", torch.from_numpy(sin), persistent=False)

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
        bias_past = torch.where(valid[:, :cache_len], 0.0, MASK_VALUE)[:, None, None, None, :]  # [B, 1, 1, 1, L]
        causal = position_ids[:, None, :] <= position_ids[:, :, None]  # [B, Tq, Tk]
        new_ok = causal & valid[:, cache_len:][:, None, :]  # [B, Tq, Tk]
        bias_new = torch.where(new_ok, 0.0, MASK_VALUE)[:, None, None, :, :]  # [B, 1, 1, T, T]
        h = self.embed_tokens(input_ids).float()  # [B, T, C] residual stream in fp32
        presents, hidden = [], [h]
        for i, layer in enumerate(self.layers):
            h, k, v = layer(h, rope, past[2 * i], past[2 * i + 1], bias_past, bias_new, self.dtype)
            presents += [k, v]
            hidden.append(h)
        idx = logits_index.unsqueeze(-1).expand(-1, -1, h.shape[-1])  # [B, N, C]
        h = self.norm(torch.gather(h, 1, idx)).to(self.dtype)  # [B, N, C]
        logits = self.lm_head(h).float()  # [B, N, V]
        if not self.expose_hidden_states:
            return (logits, *presents)
        # transformers reports the last layer after the final norm; mirror that (all positions).
        hidden[-1] = self.norm(hidden[-1])
        return (logits, *presents, *hidden)
