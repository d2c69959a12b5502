"""Multi-token prediction (MTP) module: the extra depth DeepSeek-V3 trains to predict token t+2.

Stored as checkpoint layer `num_hidden_layers + k`: `enorm`, `hnorm`, `eh_proj`, one ordinary
decoder block, and `shared_head.norm`; the embedding and output head are shared with the main
model. The input is `eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])` — embedding first, as every
implementation that loads these weights does (HF `MtpLayer`, vLLM, SGLang).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3 import ops
from dsv3.attention.context import AttentionContext
from dsv3.config import ModelConfig
from dsv3.layers.linear import Linear
from dsv3.layers.norm import RMSNorm


class SharedHead(nn.Module):
    """Holds the MTP output norm under the checkpoint's `shared_head.norm` name."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(nn.Module):
    """One MTP depth: combine (hidden, next-token embedding), run a decoder block, normalise."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, block_cls: type[nn.Module]):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.block = block_cls(cfg, layer_idx)
        self.shared_head = SharedHead(cfg)

    def forward(self, hidden: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1))
        y = ops.decode_layers(self, [self.block], x, cos, sin, ctx.native_cache(), ctx.native_slots())  # decode: one call
        return self.shared_head.norm(self.block(x, cos, sin, ctx) if y is None else y)
