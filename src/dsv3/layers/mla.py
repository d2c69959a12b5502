"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values are compressed into one `kv_lora_rank` latent per token plus a single rotary key
shared by all heads, so a cache holds `kv_lora_rank + qk_rope_head_dim` values per token per layer
(576 for V3) instead of 2·H·head_dim. Two mathematically equal forms of attention:

* expanded: re-project the latent to per-head keys/values with `kv_b_proj` (prefill, training);
* absorbed: fold W_UK into the query and W_UV into the output, attending over the latent itself
  (decode, where re-expanding every cached token each step would dominate).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3 import ops
from dsv3.attention.context import AttentionContext, IndexQuery
from dsv3.config import ModelConfig
from dsv3.layers.indexer import Indexer
from dsv3.layers.linear import Linear, dense_weight, native_form
from dsv3.layers.norm import RMSNorm
from dsv3.layers.rope import apply_rotary
from dsv3.ops.forms import NativeMLA, f32_cpu


class MLA(nn.Module):
    """MLA with HF tensor names (q_a_proj/q_b_proj or q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.scale = cfg.softmax_scale
        D, H, dqk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        if self.q_lora_rank is None:
            self.q_proj = Linear(D, H * dqk)
        else:
            self.q_a_proj = Linear(D, self.q_lora_rank)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)  # eps 1e-6 regardless of config (as HF)
            self.q_b_proj = Linear(self.q_lora_rank, H * dqk)
        self.kv_a_proj_with_mqa = Linear(D, self.kv_lora_rank + self.rope_dim)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim))
        self.o_proj = Linear(H * self.v_dim, D)
        # DeepSeek Sparse Attention (V3.2): an indexer picks the past tokens each query attends to
        self.indexer = Indexer(cfg) if cfg.index_topk else None

    def native_form(self) -> NativeMLA | None:
        """The whole layer for the native kernel: every projection native, fp32 norms and kv_b (dequantized if packed)."""
        if self.indexer is not None:  # the native kernel attends densely
            return None
        lowrank = self.q_lora_rank is not None
        q_a = native_form(self.q_a_proj) if lowrank else None
        q_b = native_form(self.q_b_proj if lowrank else self.q_proj)
        kv_a, o = native_form(self.kv_a_proj_with_mqa), native_form(self.o_proj)
        q_norm = self.q_a_layernorm.weight if lowrank else None
        # kv_b as the layer holds it ([H·(dn+dv), C], read as [H, dn+dv, C]): the weight itself, or the dequantized
        # copy a packed layer keeps; never a view made here, which would keep pointing at storage the weight left
        w_kvb = dense_weight(self.kv_b_proj) if native_form(self.kv_b_proj) is not None else None
        if (lowrank and q_a is None) or None in (q_b, kv_a, o, w_kvb) or \
                not f32_cpu(q_norm, self.kv_a_layernorm.weight, w_kvb):
            return None
        dims = (self.o_proj.out_features, self.n_heads, self.nope_dim, self.rope_dim, self.v_dim, self.kv_lora_rank,
                self.q_lora_rank or 0)
        fdims = (self.q_a_layernorm.eps if lowrank else 0.0, self.kv_a_layernorm.eps, self.scale)
        return NativeMLA(q_a, q_b, kv_a, o, q_norm, self.kv_a_layernorm.weight, w_kvb, dims, fdims)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """x [B, T, D]; cos/sin [B, T, dr/2] for the tokens' positions."""
        B, T, _ = x.shape
        if ops.native(x):
            keys = ctx.native_keys(self.layer_idx)
            if keys is not None:
                y = ops.mla_decode(x, self.native_form(), cos, sin, keys.cache, keys.slot_mapping, keys.key_slots,
                                   keys.key_mask)
                if y is not None:
                    return y
        q_resid = None if self.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_proj(x) if q_resid is None else self.q_b_proj(q_resid)
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        # the shared rotary key rides along as an extra head: one rotation for queries and key
        pe = apply_rotary(torch.cat([q_pe, k_pe[:, :, None]], dim=2), cos[:, :, None], sin[:, :, None])
        q_pe = pe[:, :, : self.n_heads]
        latent = torch.cat([self.kv_a_layernorm(c), pe[:, :, self.n_heads]], dim=-1)
        if self.indexer is not None:
            iq, w, keys = self.indexer(x, q_resid, cos, sin)
            out = ctx.attend(self, q_nope, q_pe, latent, IndexQuery(iq, w, keys, self.indexer.topk))
        else:
            out = ctx.attend(self, q_nope, q_pe, latent)
        return self.o_proj(out.flatten(2))

    def kv_b_weight(self, with_lora: bool = True) -> torch.Tensor:
        """kv_b_proj as a dense [H, dn+dv, kv_lora_rank] tensor (quantized layers dequantize here).

        `with_lora=False` gives a LoRA layer's frozen base weight, when its deltas are applied per slot.
        """
        proj = self.kv_b_proj if with_lora else getattr(self.kv_b_proj, "base_layer", self.kv_b_proj)
        return dense_weight(proj).view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)

    def _kv_b_lora(self, slots, rows: int) -> list | None:
        """kv_b_proj's per-adapter terms (rows, A, B, s) for a multi-adapter batch; None without one."""
        terms = getattr(self.kv_b_proj, "lora_terms", None)
        return None if slots is None or terms is None else terms(slots, rows)
